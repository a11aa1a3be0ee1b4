//! [`KubeStore`]: the profile store in the Kubernetes API server, one
//! [`WorkloadProfile`] per workload container, and the conversions between those
//! objects and the store's [`WorkloadRecord`].
//!
//! A `WorkloadProfile` is named `<kind>.<name>.<container>` in the workload's
//! namespace. Its spec holds the baseline, the last versions with their profiles
//! inline, the pinned version and the approvals; its status (a subresource, so
//! written separately and by other identities, such as the crash watcher) holds
//! the fallback.
//!
//! Writers coordinate through `resourceVersion`: an update reads the object, runs
//! the caller's change on it and replaces it with the version it read; a `409
//! Conflict` (another writer came first) starts over from a fresh read, a bounded
//! number of times. Nothing is lost and nothing is locked.

use crate::abi::Abi;
use crate::baseline::{Baseline, Excluded, SyscallStats};
use crate::crd::{
    BaselineSummary, FallbackState, InlineProfileError, ProfileVersion, SyscallSummary, VersionState, WorkloadProfile,
    WorkloadProfileSpec, WorkloadProfileStatus, WorkloadRef,
};
use crate::key::WorkloadKey;
use crate::render::{Arch, Rendered, SeccompProfile, Version};
use crate::store::{
    FORMAT, Fallback, ProfileStore, StoreError, VersionMeta, VersionStatus, WorkloadRecord, WorkloadState,
};
use jiff::Timestamp;
use kube::api::{Api, ListParams, PostParams};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Mutex;

/// How many versions a `WorkloadProfile` keeps by default (plus the pinned one,
/// when it is older): each carries its profile inline, and an object must stay
/// well under the API server's 1.5 MiB limit.
pub const DEFAULT_KEEP: usize = 10;

/// How many times an update reads and writes before it gives up on `409
/// Conflict`: more than that means something rewrites the object in a loop.
pub const DEFAULT_ATTEMPTS: usize = 5;

/// The name of `key`'s `WorkloadProfile` ([`WorkloadProfile::object_name`]),
/// refused when it is longer than an object name may be.
pub fn object_name(key: &WorkloadKey) -> Result<String, StoreError> {
    let name = WorkloadProfile::object_name(key);
    // Object names are DNS-1123 subdomains: 253 characters at most.
    if name.len() > 253 {
        return Err(StoreError::ObjectName {
            key: Box::new(key.clone()),
            name,
        });
    }
    Ok(name)
}

/// `workloadprofile <namespace>/<name>`: how errors name the object.
fn describe(key: &WorkloadKey) -> String {
    match object_name(key) {
        Ok(name) => format!("workloadprofile {}/{name}", key.namespace()),
        Err(_) => format!("the workloadprofile of {key}"),
    }
}

fn invalid(key: &WorkloadKey, reason: String) -> StoreError {
    StoreError::InvalidObject {
        object: describe(key),
        reason,
    }
}

fn time(key: &WorkloadKey, field: &str, text: &str) -> Result<Timestamp, StoreError> {
    text.parse()
        .map_err(|e| invalid(key, format!("{field} `{text}` is not an RFC 3339 time ({e})")))
}

fn opt_time(key: &WorkloadKey, field: &str, text: &Option<String>) -> Result<Option<Timestamp>, StoreError> {
    text.as_deref().map(|t| time(key, field, t)).transpose()
}

/// The baseline as the CRD holds it: every field, the sets as sorted lists.
pub fn baseline_summary(b: &Baseline) -> BaselineSummary {
    BaselineSummary {
        events: b.events,
        processes: b.processes,
        exits: b.exits,
        exec_probe_events: b.exec_probe_events,
        excluded_not_in_init_tree: b.excluded.not_in_init_tree,
        dropped_on_nodes: b.dropped_on_nodes,
        syscalls: b
            .syscalls
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    SyscallSummary {
                        count: s.count,
                        first_seen: s.first_seen.map(|t| t.to_string()),
                        last_seen: s.last_seen.map(|t| t.to_string()),
                    },
                )
            })
            .collect(),
        abis: b.abis.iter().map(Abi::to_string).collect(),
        pods: b.pods.iter().cloned().collect(),
        nodes: b.nodes.iter().cloned().collect(),
        first_seen: b.window_start.map(|t| t.to_string()),
        last_seen: b.window_end.map(|t| t.to_string()),
    }
}

/// The [`Baseline`] of `key` that [`baseline_summary`] wrote.
pub fn baseline_from_summary(key: &WorkloadKey, s: &BaselineSummary) -> Result<Baseline, StoreError> {
    let mut syscalls = BTreeMap::new();
    for (name, stats) in &s.syscalls {
        let field = format!("spec.baseline.syscalls.{name}");
        syscalls.insert(
            name.clone(),
            SyscallStats {
                count: stats.count,
                first_seen: opt_time(key, &format!("{field}.firstSeen"), &stats.first_seen)?,
                last_seen: opt_time(key, &format!("{field}.lastSeen"), &stats.last_seen)?,
            },
        );
    }
    let abis = s
        .abis
        .iter()
        .map(|a| {
            a.parse::<Abi>()
                .map_err(|e| invalid(key, format!("spec.baseline.abis: {e}")))
        })
        .collect::<Result<BTreeSet<Abi>, StoreError>>()?;
    Ok(Baseline {
        key: key.clone(),
        syscalls,
        pods: s.pods.iter().cloned().collect(),
        nodes: s.nodes.iter().cloned().collect(),
        abis,
        events: s.events,
        processes: s.processes,
        exits: s.exits,
        exec_probe_events: s.exec_probe_events,
        excluded: Excluded {
            not_in_init_tree: s.excluded_not_in_init_tree,
        },
        dropped_on_nodes: s.dropped_on_nodes,
        window_start: opt_time(key, "spec.baseline.firstSeen", &s.first_seen)?,
        window_end: opt_time(key, "spec.baseline.lastSeen", &s.last_seen)?,
    })
}

fn arch_name(arch: Arch) -> String {
    match serde_json::to_value(arch) {
        Ok(serde_json::Value::String(s)) => s,
        // A unit enum always serializes to its name.
        _ => format!("{arch:?}").to_lowercase(),
    }
}

/// The spec of `record`'s `WorkloadProfile`. `profiles` must hold the profile of
/// every version of the record (the store's version files, inline here).
pub fn spec_from_record(
    record: &WorkloadRecord,
    profiles: &BTreeMap<Version, SeccompProfile>,
) -> Result<WorkloadProfileSpec, StoreError> {
    let key = record.key();
    let mut versions = Vec::with_capacity(record.state.versions.len());
    for meta in &record.state.versions {
        let profile = profiles.get(&meta.version).ok_or_else(|| StoreError::UnknownVersion {
            key: key.clone(),
            version: meta.version.clone(),
        })?;
        versions.push(ProfileVersion {
            version: meta.version.to_string(),
            created: meta.created.to_string(),
            runtime: meta.runtime.clone(),
            arch: arch_name(meta.arch),
            status: match meta.status {
                VersionStatus::Draft => VersionState::Draft,
                VersionStatus::Validated => VersionState::Validated,
            },
            needs_review: meta.needs_review.clone(),
            profile: serde_json::to_value(profile)
                .map_err(|e| invalid(key, format!("version {}: {e}", meta.version)))?,
        });
    }
    Ok(WorkloadProfileSpec {
        workload: WorkloadRef {
            kind: key.kind().to_string(),
            name: key.name().to_string(),
            container: key.container().to_string(),
        },
        baseline: baseline_summary(&record.baseline),
        versions,
        active_version: record.state.pinned.as_ref().map(Version::to_string),
        approvals: record.state.approvals.iter().cloned().collect(),
    })
}

/// The fallback as the status holds it.
pub fn fallback_state(f: &Fallback) -> FallbackState {
    FallbackState {
        reason: f.reason.clone(),
        since: f.since.to_string(),
        pod: None,
    }
}

/// The record (and the verified profiles of its versions) that a `WorkloadProfile`
/// of `key` holds. Fails, naming the object and field, when the object is not one
/// tether could have written: another workload's spec, a bad time or version, or
/// a profile that does not hash to its version.
pub fn record_from_object(
    key: &WorkloadKey,
    spec: &WorkloadProfileSpec,
    status: Option<&WorkloadProfileStatus>,
) -> Result<Stored, StoreError> {
    let w = &spec.workload;
    if (w.kind.as_str(), w.name.as_str(), w.container.as_str()) != (key.kind(), key.name(), key.container()) {
        return Err(invalid(
            key,
            format!(
                "spec.workload is {}/{}/{}, not the {}/{}/{} its name says",
                w.kind,
                w.name,
                w.container,
                key.kind(),
                key.name(),
                key.container()
            ),
        ));
    }
    let mut profiles = BTreeMap::new();
    let mut versions = Vec::with_capacity(spec.versions.len());
    for (i, v) in spec.versions.iter().enumerate() {
        let field = format!("spec.versions[{i}]");
        let version: Version = v
            .version
            .parse()
            .map_err(|e| invalid(key, format!("{field}.version: {e}")))?;
        let profile = v.verified_profile().map_err(|e| match e {
            InlineProfileError::NotAProfile(e) => invalid(key, format!("{field}.profile is not a seccomp profile ({e})")),
            InlineProfileError::Altered { actual } => invalid(
                key,
                format!(
                    "{field}.profile hashes to {actual}, not to its version {version}: it was altered; restore the object from a backup or delete it and build again"
                ),
            ),
        })?;
        let arch: Arch = serde_json::from_value(serde_json::Value::String(v.arch.clone()))
            .map_err(|_| invalid(key, format!("{field}.arch `{}` is not x86_64 or aarch64", v.arch)))?;
        versions.push(VersionMeta {
            version: version.clone(),
            created: time(key, &format!("{field}.created"), &v.created)?,
            runtime: v.runtime.clone(),
            arch,
            // Every version is rendered with `allowed` = the profile's allowed set,
            // so the object need not repeat it.
            allowed: profile.allowed().len(),
            needs_review: v.needs_review.clone(),
            status: match v.status {
                VersionState::Draft => VersionStatus::Draft,
                VersionState::Validated => VersionStatus::Validated,
            },
        });
        profiles.insert(version, profile);
    }
    let pinned = spec
        .active_version
        .as_deref()
        .map(|v| {
            v.parse::<Version>()
                .map_err(|e| invalid(key, format!("spec.activeVersion: {e}")))
        })
        .transpose()?;
    let fallback = match status.and_then(|s| s.fallback.as_ref()) {
        Some(f) => Some(Fallback {
            reason: f.reason.clone(),
            since: time(key, "status.fallback.since", &f.since)?,
        }),
        None => None,
    };
    let record = WorkloadRecord {
        format: FORMAT,
        baseline: baseline_from_summary(key, &spec.baseline)?,
        state: WorkloadState {
            pinned,
            approvals: spec.approvals.iter().cloned().collect(),
            fallback,
            versions,
        },
    };
    Ok((record, profiles))
}

/// Drops the oldest versions beyond `keep` (at least one is kept), except the
/// pinned one: a pinned version stays however old it is, because pods reference
/// it. The newest is never dropped, so the active version always stays.
pub fn prune(record: &mut WorkloadRecord, keep: usize) {
    let keep = keep.max(1);
    let n = record.state.versions.len();
    if n <= keep {
        return;
    }
    let drop_below = n - keep;
    let pinned = record.state.pinned.clone();
    let mut i = 0;
    record.state.versions.retain(|v| {
        let keep_it = i >= drop_below || Some(&v.version) == pinned.as_ref();
        i += 1;
        keep_it
    });
}

/// The profile store in the Kubernetes API server (see the module docs).
///
/// The [`ProfileStore`] trait and the CLI are synchronous, the kube client is
/// not: the store owns a small tokio runtime (one worker thread, which also runs
/// the client's connection tasks between calls) and blocks the calling thread on
/// each request. Call it from plain threads, never from inside an async runtime:
/// there every method returns [`StoreError::InsideAsyncRuntime`] instead of
/// blocking a runtime thread (use `spawn_blocking` there). Several threads may
/// share one store.
///
/// Versions live inline in their workload's object: [`ProfileStore::put_version`]
/// checks the profile against its version and keeps it until the
/// [`ProfileStore::update`] that records the version writes it (what
/// [`render_version`](crate::store::render_version) does). The Log-mode variant of
/// each version is derived when asked for, not stored.
pub struct KubeStore {
    client: kube::Client,
    runtime: OwnedRuntime,
    keep: usize,
    attempts: usize,
    /// Profiles known to this handle and not known to be in the API server yet
    /// (put, or read during an update), by key and version. Versions are
    /// content-addressed, so an entry is never stale.
    profiles: Mutex<HashMap<WorkloadKey, BTreeMap<Version, SeccompProfile>>>,
}

/// The store's runtime, shut down without waiting when the store is dropped:
/// dropping a runtime the usual way blocks, which panics inside another runtime.
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl OwnedRuntime {
    fn get(&self) -> Result<&tokio::runtime::Runtime, StoreError> {
        // Only `drop` takes it out.
        self.0.as_ref().ok_or(StoreError::InsideAsyncRuntime)
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("keep", &self.keep)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

fn refuse_inside_runtime() -> Result<(), StoreError> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(StoreError::InsideAsyncRuntime);
    }
    Ok(())
}

/// Whether `e` says that the named object does not exist. A 404 that names no
/// object means the API server does not serve the resource at all (CRDs missing).
fn is_absent(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404 && s.details.as_ref().is_some_and(|d| !d.name.is_empty()))
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Maps a client error to the store error that says what to do about it.
fn kube_err(e: kube::Error, verb: &'static str, object: String) -> StoreError {
    match e {
        kube::Error::Api(s) if s.code == 404 && s.details.as_ref().is_none_or(|d| d.name.is_empty()) => {
            StoreError::CrdsNotInstalled { message: s.message }
        }
        kube::Error::Api(s) if s.code == 403 => StoreError::Forbidden {
            verb,
            object,
            message: s.message,
        },
        kube::Error::Api(s) if s.code == 401 => StoreError::Unauthorized { message: s.message },
        kube::Error::Api(s) => StoreError::Api {
            verb,
            object,
            code: s.code,
            message: s.message,
        },
        other => StoreError::Kube {
            verb,
            object,
            cause: Box::new(other),
        },
    }
}

/// A record and the profiles of its versions.
type Stored = (WorkloadRecord, BTreeMap<Version, SeccompProfile>);

/// What an update wrote, so the status write can follow the spec write.
enum Written {
    /// Nothing was written yet; the object as read (if any).
    Nothing(Option<WorkloadProfile>),
    /// The spec was written (created or replaced): the server's copy.
    Spec(WorkloadProfile),
}

impl KubeStore {
    /// Connects with the usual client configuration: `KUBECONFIG` or
    /// `~/.kube/config`, else the pod's service account.
    pub fn connect() -> Result<KubeStore, StoreError> {
        refuse_inside_runtime()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tether-kube")
            .enable_all()
            .build()
            .map_err(|source| StoreError::Runtime { source })?;
        let client = runtime
            .block_on(kube::Client::try_default())
            .map_err(|e| StoreError::KubeConfig { reason: e.to_string() })?;
        Ok(KubeStore::new(client, runtime))
    }

    /// A store over `client`, whose requests run on `runtime` (the client must
    /// have been created inside it).
    pub fn new(client: kube::Client, runtime: tokio::runtime::Runtime) -> KubeStore {
        KubeStore {
            client,
            runtime: OwnedRuntime(Some(runtime)),
            keep: DEFAULT_KEEP,
            attempts: DEFAULT_ATTEMPTS,
            profiles: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps the last `keep` versions per workload (at least 1; the pinned
    /// version is kept besides).
    pub fn with_keep(mut self, keep: usize) -> KubeStore {
        self.keep = keep.max(1);
        self
    }

    /// Gives up an update after `attempts` conflicts (at least 1).
    pub fn with_attempts(mut self, attempts: usize) -> KubeStore {
        self.attempts = attempts.max(1);
        self
    }

    fn block_on<T>(&self, fut: impl Future<Output = T>) -> Result<T, StoreError> {
        refuse_inside_runtime()?;
        Ok(self.runtime.get()?.block_on(fut))
    }

    fn api(&self, key: &WorkloadKey) -> Api<WorkloadProfile> {
        Api::namespaced(self.client.clone(), key.namespace())
    }

    /// The object of `key`, `None` when absent.
    fn get(&self, key: &WorkloadKey, name: &str) -> Result<Option<WorkloadProfile>, StoreError> {
        let api = self.api(key);
        match self.block_on(api.get(name))? {
            Ok(obj) => Ok(Some(obj)),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(kube_err(e, "get", describe(key))),
        }
    }

    /// `(namespace, name, resourceVersion)` of every `WorkloadProfile`, page by page.
    fn list_all(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let api: Api<WorkloadProfile> = Api::all(self.client.clone());
        let mut params = ListParams::default().limit(500);
        let mut out = Vec::new();
        loop {
            let page = self
                .block_on(api.list_metadata(&params))?
                .map_err(|e| kube_err(e, "list", "workloadprofiles in all namespaces".into()))?;
            for item in page.items {
                let m = item.metadata;
                out.push((
                    m.namespace.unwrap_or_default(),
                    m.name.unwrap_or_default(),
                    m.resource_version.unwrap_or_default(),
                ));
            }
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => params = params.continue_token(&token),
                _ => return Ok(out),
            }
        }
    }

    fn cached(&self, key: &WorkloadKey, version: &Version) -> Option<SeccompProfile> {
        let profiles = self.profiles.lock().unwrap_or_else(|e| e.into_inner());
        profiles.get(key).and_then(|m| m.get(version)).cloned()
    }

    fn remember(&self, key: &WorkloadKey, found: &BTreeMap<Version, SeccompProfile>) {
        let mut profiles = self.profiles.lock().unwrap_or_else(|e| e.into_inner());
        let entry = profiles.entry(key.clone()).or_default();
        for (v, p) in found {
            entry.entry(v.clone()).or_insert_with(|| p.clone());
        }
    }

    /// Forgets the profiles of `stored` (and their Log-mode variants), which the
    /// API server holds (or held: a pruned version is gone for good).
    fn forget(&self, key: &WorkloadKey, stored: &BTreeMap<Version, SeccompProfile>) {
        let mut profiles = self.profiles.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = profiles.get_mut(key) {
            for (v, p) in stored {
                entry.remove(v);
                entry.remove(&p.log_variant().version());
            }
            if entry.is_empty() {
                profiles.remove(key);
            }
        }
    }

    /// Writes the status's fallback. Before the spec was written a conflict is
    /// the caller's to retry (from a fresh read, running its change again); after
    /// it, only the fallback is left to write, so it is retried on fresh reads
    /// here, without running the change (and adding its counts) twice.
    fn write_fallback(
        &self,
        key: &WorkloadKey,
        name: &str,
        mut obj: WorkloadProfile,
        fallback: Option<&Fallback>,
        spec_written: bool,
    ) -> Result<Option<WorkloadProfile>, StoreError> {
        let api = self.api(key);
        for _ in 0..self.attempts {
            let mut status = obj.status.clone().unwrap_or_default();
            status.fallback = fallback.map(fallback_state);
            status.observed_generation = obj.metadata.generation;
            obj.status = Some(status);
            match self.block_on(api.replace_status(name, &PostParams::default(), &obj))? {
                Ok(written) => return Ok(Some(written)),
                Err(e) if is_code(&e, 409) && !spec_written => return Ok(None),
                Err(e) if is_code(&e, 409) => match self.get(key, name)? {
                    Some(fresh) => obj = fresh,
                    None => return Err(invalid(key, "it was deleted while its fallback was written".into())),
                },
                Err(e) => return Err(kube_err(e, "update the status of", describe(key))),
            }
        }
        Err(StoreError::Conflict {
            object: describe(key),
            attempts: self.attempts,
        })
    }

    /// One read-change-write round; `Ok(None)` when another writer came first.
    fn try_update(
        &self,
        key: &WorkloadKey,
        name: &str,
        f: &mut dyn FnMut(&mut WorkloadRecord) -> Result<(), StoreError>,
        seen: &mut BTreeMap<Version, SeccompProfile>,
    ) -> Result<Option<WorkloadRecord>, StoreError> {
        let current = self.get(key, name)?;
        let (mut record, mut profiles) = match &current {
            Some(obj) => record_from_object(key, &obj.spec, obj.status.as_ref())?,
            None => (WorkloadRecord::new(key.clone()), BTreeMap::new()),
        };
        // What the change reads through `profile` (render_version compares with the
        // newest version) comes from this read, not from another request.
        self.remember(key, &profiles);
        seen.extend(profiles.iter().map(|(v, p)| (v.clone(), p.clone())));
        let before = record.clone();
        // The change runs outside the runtime: it may call back into this store.
        f(&mut record)?;
        prune(&mut record, self.keep);
        if record == before {
            return Ok(Some(record));
        }
        for meta in &record.state.versions {
            if !profiles.contains_key(&meta.version) {
                let p = self
                    .cached(key, &meta.version)
                    .ok_or_else(|| StoreError::UnknownVersion {
                        key: key.clone(),
                        version: meta.version.clone(),
                    })?;
                profiles.insert(meta.version.clone(), p);
            }
        }
        profiles.retain(|v, _| record.version(v).is_some());
        let spec = spec_from_record(&record, &profiles)?;
        let api = self.api(key);
        let mut written = Written::Nothing(current.clone());
        let spec_changed = current.as_ref().is_none_or(|obj| obj.spec != spec);
        if spec_changed {
            let result = match current {
                None => {
                    let obj = WorkloadProfile::new(name, spec);
                    self.block_on(api.create(&PostParams::default(), &obj))?.map_err(|e| {
                        if is_code(&e, 409) {
                            None
                        } else {
                            Some(kube_err(e, "create", describe(key)))
                        }
                    })
                }
                Some(mut obj) => {
                    // `obj` keeps the resourceVersion it was read with: the server
                    // refuses the write (409) if anyone wrote since.
                    obj.spec = spec;
                    self.block_on(api.replace(name, &PostParams::default(), &obj))?
                        .map_err(|e| {
                            // Deleted since the read: the next round creates it.
                            if is_code(&e, 409) || is_absent(&e) {
                                None
                            } else {
                                Some(kube_err(e, "update", describe(key)))
                            }
                        })
                }
            };
            match result {
                Ok(obj) => {
                    seen.extend(profiles.iter().map(|(v, p)| (v.clone(), p.clone())));
                    written = Written::Spec(obj);
                }
                // Created meanwhile (AlreadyExists) or changed meanwhile (Conflict).
                Err(None) => return Ok(None),
                Err(Some(e)) => return Err(e),
            }
        }
        if record.state.fallback != before.state.fallback {
            let (obj, spec_written) = match written {
                Written::Spec(obj) => (obj, true),
                Written::Nothing(Some(obj)) => (obj, false),
                // A new object always has a spec to create first.
                Written::Nothing(None) => return Err(invalid(key, "no object to write the status of".into())),
            };
            if self
                .write_fallback(key, name, obj, record.state.fallback.as_ref(), spec_written)?
                .is_none()
            {
                return Ok(None);
            }
        }
        Ok(Some(record))
    }
}

impl ProfileStore for KubeStore {
    fn keys(&self) -> Result<Vec<WorkloadKey>, StoreError> {
        let mut keys = Vec::new();
        for (namespace, name, _) in self.list_all()? {
            match WorkloadProfile::key_of_name(&namespace, &name) {
                Some(key) => keys.push(key),
                None => tracing::warn!(
                    object = %format!("{namespace}/{name}"),
                    "skipping a workloadprofile whose name is not <kind>.<name>.<container>"
                ),
            }
        }
        keys.sort();
        Ok(keys)
    }

    fn record(&self, key: &WorkloadKey) -> Result<Option<WorkloadRecord>, StoreError> {
        let name = object_name(key)?;
        match self.get(key, &name)? {
            Some(obj) => Ok(Some(record_from_object(key, &obj.spec, obj.status.as_ref())?.0)),
            None => Ok(None),
        }
    }

    /// The object's `resourceVersion`, from a metadata-only read (no profiles).
    fn record_stamp(&self, key: &WorkloadKey) -> Result<Option<String>, StoreError> {
        let name = object_name(key)?;
        let api = self.api(key);
        match self.block_on(api.get_metadata(&name))? {
            Ok(meta) => Ok(meta.metadata.resource_version),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(kube_err(e, "get", describe(key))),
        }
    }

    /// A digest of every object's name and `resourceVersion`, from one
    /// metadata-only list: it moves with every write to a `WorkloadProfile` (and
    /// with deletions), and not with the rest of the cluster's writes, as the
    /// list's own resourceVersion would.
    fn generation(&self) -> Result<Option<String>, StoreError> {
        let mut all = self.list_all()?;
        all.sort();
        let mut hash = Sha256::new();
        for (namespace, name, rv) in &all {
            hash.update(format!("{namespace}/{name}@{rv}\n"));
        }
        let digest: String = hash.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
        Ok(Some(digest))
    }

    fn profile(&self, key: &WorkloadKey, version: &Version) -> Result<SeccompProfile, StoreError> {
        if let Some(p) = self.cached(key, version) {
            return Ok(p);
        }
        let name = object_name(key)?;
        let unknown = || StoreError::UnknownVersion {
            key: key.clone(),
            version: version.clone(),
        };
        let Some(obj) = self.get(key, &name)? else {
            return Err(unknown());
        };
        let (_, profiles) = record_from_object(key, &obj.spec, obj.status.as_ref())?;
        if let Some(p) = profiles.get(version) {
            return Ok(p.clone());
        }
        profiles
            .values()
            .map(SeccompProfile::log_variant)
            .find(|l| &l.version() == version)
            .ok_or_else(unknown)
    }

    fn put_version(&self, key: &WorkloadKey, rendered: &Rendered) -> Result<(), StoreError> {
        let actual = rendered.profile.version();
        if actual != rendered.version {
            return Err(StoreError::VersionMismatch {
                key: Box::new(key.clone()),
                version: rendered.version.clone(),
                actual,
            });
        }
        object_name(key)?;
        let mut profiles = self.profiles.lock().unwrap_or_else(|e| e.into_inner());
        profiles
            .entry(key.clone())
            .or_default()
            .entry(rendered.version.clone())
            .or_insert_with(|| rendered.profile.clone());
        Ok(())
    }

    fn update(
        &self,
        key: &WorkloadKey,
        f: &mut dyn FnMut(&mut WorkloadRecord) -> Result<(), StoreError>,
    ) -> Result<WorkloadRecord, StoreError> {
        let name = object_name(key)?;
        for attempt in 1..=self.attempts {
            let mut seen = BTreeMap::new();
            let result = self.try_update(key, &name, f, &mut seen);
            // What the round read or wrote is in the API server: only profiles put
            // and not written yet stay with this handle.
            self.forget(key, &seen);
            if let Some(record) = result? {
                return Ok(record);
            }
            tracing::debug!(object = %describe(key), attempt, "conflict: reading again");
        }
        Err(StoreError::Conflict {
            object: describe(key),
            attempts: self.attempts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::RuntimeBase;
    use crate::store::render_version;
    use crate::store::tests::rendered;
    use api_script::{Call, Script};
    use http::Method;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    const OBJECT: &str = "/apis/tether.dev/v1alpha1/namespaces/shop/workloadprofiles/deployment.checkout.app";
    const STATUS: &str = "/apis/tether.dev/v1alpha1/namespaces/shop/workloadprofiles/deployment.checkout.app/status";
    const COLLECTION: &str = "/apis/tether.dev/v1alpha1/namespaces/shop/workloadprofiles";
    const ALL: &str = "/apis/tether.dev/v1alpha1/workloadprofiles";

    fn key() -> WorkloadKey {
        "shop/deployment/checkout/app".parse().unwrap()
    }

    /// An expected call; a `Value::Null` answer echoes the write, stored under a
    /// new resourceVersion (`<position>00`).
    fn call(method: Method, path: &'static str, status: u16, body: Value) -> Call {
        let echo = body.is_null();
        let call = Call::new(method, path, status, body);
        if echo {
            call.answer_with(|i, sent| stored(sent, &format!("{i}00")))
        } else {
            call
        }
    }

    fn checked(c: Call, check: impl FnOnce(&Value) + Send + 'static) -> Call {
        c.check(check)
    }

    fn status_body(code: u16, reason: &str, message: &str, name: Option<&str>) -> Value {
        let details = match name {
            Some(n) => json!({"name": n, "group": "tether.dev", "kind": "workloadprofiles"}),
            None => json!({}),
        };
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "details": details, "code": code})
    }

    fn not_found() -> Value {
        status_body(
            404,
            "NotFound",
            "workloadprofiles.tether.dev \"deployment.checkout.app\" not found",
            Some("deployment.checkout.app"),
        )
    }

    fn conflict() -> Value {
        status_body(
            409,
            "Conflict",
            "Operation cannot be fulfilled on workloadprofiles.tether.dev \"deployment.checkout.app\": the object has been modified; please apply your changes to the latest version and try again",
            Some("deployment.checkout.app"),
        )
    }

    /// The object as the API server returns it.
    fn object(rv: &str, record: &WorkloadRecord, profiles: &BTreeMap<Version, SeccompProfile>) -> Value {
        let mut wp = WorkloadProfile::new("deployment.checkout.app", spec_from_record(record, profiles).unwrap());
        wp.metadata.namespace = Some("shop".into());
        wp.metadata.resource_version = Some(rv.into());
        wp.metadata.generation = Some(rv.parse().unwrap());
        wp.status = record.state.fallback.as_ref().map(|f| WorkloadProfileStatus {
            fallback: Some(fallback_state(f)),
            observed_generation: None,
        });
        serde_json::to_value(wp).unwrap()
    }

    /// The object a write sent, answered as stored under `rv`.
    fn stored(sent: &Value, rv: &str) -> Value {
        let mut v = sent.clone();
        v["metadata"]["resourceVersion"] = json!(rv);
        v["metadata"]["namespace"] = json!("shop");
        v
    }

    /// A store whose API server plays `calls` in order, fails on any call out of
    /// script, and fails when a scripted call never comes.
    fn scenario(calls: Vec<Call>) -> (KubeStore, Script) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (client, script) = runtime.block_on(async { api_script::serve(calls, "default") });
        (KubeStore::new(client, runtime), script)
    }

    fn finish(store: &KubeStore, script: Script) {
        store.runtime.get().unwrap().block_on(script.finish());
    }

    fn meta(r: &Rendered, second: i64) -> VersionMeta {
        VersionMeta {
            version: r.version.clone(),
            created: Timestamp::from_second(1_750_000_000 + second).unwrap(),
            runtime: "runc".into(),
            arch: Arch::X86_64,
            allowed: r.profile.allowed().len(),
            needs_review: r.needs_review.clone(),
            status: VersionStatus::Draft,
        }
    }

    fn with_events(events: u64) -> WorkloadRecord {
        let mut r = WorkloadRecord::new(key());
        r.baseline.events = events;
        r
    }

    #[test]
    fn update_creates_the_object_when_absent() {
        let (store, server) = scenario(vec![
            call(Method::GET, OBJECT, 404, not_found()),
            checked(
                call(
                    Method::POST,
                    COLLECTION,
                    201,
                    object("1", &with_events(3), &BTreeMap::new()),
                ),
                |sent| {
                    assert_eq!(sent["metadata"]["name"], "deployment.checkout.app");
                    assert!(sent["metadata"].get("resourceVersion").is_none(), "{sent}");
                    assert_eq!(
                        sent["spec"]["workload"],
                        json!({"kind": "deployment", "name": "checkout", "container": "app"})
                    );
                    assert_eq!(sent["spec"]["baseline"]["events"], 3);
                },
            ),
        ]);
        let record = store
            .update(&key(), &mut |r| {
                r.baseline.events += 3;
                Ok(())
            })
            .unwrap();
        assert_eq!(record.baseline.events, 3);
        finish(&store, server);
    }

    #[test]
    fn an_update_replaces_with_the_resource_version_it_read() {
        let (store, server) = scenario(vec![
            call(Method::GET, OBJECT, 200, object("7", &with_events(1), &BTreeMap::new())),
            checked(
                call(Method::PUT, OBJECT, 200, object("8", &with_events(2), &BTreeMap::new())),
                |sent| {
                    assert_eq!(sent["metadata"]["resourceVersion"], "7");
                    assert_eq!(sent["spec"]["baseline"]["events"], 2);
                },
            ),
        ]);
        let record = store
            .update(&key(), &mut |r| {
                r.baseline.events += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(record.baseline.events, 2);
        finish(&store, server);
    }

    #[test]
    fn an_update_that_changes_nothing_or_fails_writes_nothing() {
        let (store, server) = scenario(vec![
            call(Method::GET, OBJECT, 200, object("7", &with_events(1), &BTreeMap::new())),
            call(Method::GET, OBJECT, 200, object("7", &with_events(1), &BTreeMap::new())),
        ]);
        store.update(&key(), &mut |_| Ok(())).unwrap();
        let err = store
            .update(&key(), &mut |r| {
                r.baseline.events = 100;
                Err(StoreError::Refused("no".into()))
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::Refused(_)), "{err}");
        finish(&store, server);
    }

    /// Another writer approved `ptrace` between our read and our write: the 409 is
    /// retried from a fresh read, and the stored object has both changes.
    #[test]
    fn a_conflict_is_retried_after_a_fresh_read_and_loses_no_update() {
        let mut theirs = with_events(1);
        theirs.state.approvals.insert("ptrace".into());
        let (store, server) = scenario(vec![
            call(Method::GET, OBJECT, 200, object("7", &with_events(1), &BTreeMap::new())),
            checked(call(Method::PUT, OBJECT, 409, conflict()), |sent| {
                assert_eq!(sent["metadata"]["resourceVersion"], "7");
            }),
            call(Method::GET, OBJECT, 200, object("8", &theirs, &BTreeMap::new())),
            checked(
                call(Method::PUT, OBJECT, 200, object("9", &with_events(2), &BTreeMap::new())),
                |sent| {
                    assert_eq!(sent["metadata"]["resourceVersion"], "8");
                    assert_eq!(sent["spec"]["baseline"]["events"], 2);
                    assert_eq!(sent["spec"]["approvals"], json!(["bpf", "ptrace"]));
                },
            ),
        ]);
        let mut runs = 0;
        let record = store
            .update(&key(), &mut |r| {
                runs += 1;
                r.baseline.events += 1;
                r.state.approvals.insert("bpf".into());
                Ok(())
            })
            .unwrap();
        assert_eq!(runs, 2);
        assert_eq!(
            record.state.approvals.iter().map(String::as_str).collect::<Vec<_>>(),
            ["bpf", "ptrace"]
        );
        finish(&store, server);
    }

    #[test]
    fn an_update_gives_up_after_the_bound_naming_the_object() {
        let existing = object("7", &with_events(1), &BTreeMap::new());
        let (store, server) = scenario(vec![
            call(Method::GET, OBJECT, 200, existing.clone()),
            call(Method::PUT, OBJECT, 409, conflict()),
            call(Method::GET, OBJECT, 200, existing),
            call(Method::PUT, OBJECT, 409, conflict()),
        ]);
        let store = store.with_attempts(2);
        let err = store
            .update(&key(), &mut |r| {
                r.baseline.events += 1;
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { attempts: 2, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("workloadprofile shop/deployment.checkout.app") && msg.contains("409"),
            "{msg}"
        );
        finish(&store, server);
    }

    #[test]
    fn a_create_that_loses_the_race_is_retried_as_an_update() {
        let (store, server) = scenario(vec![
            call(Method::GET, OBJECT, 404, not_found()),
            call(
                Method::POST,
                COLLECTION,
                409,
                status_body(409, "AlreadyExists", "already exists", Some("deployment.checkout.app")),
            ),
            call(Method::GET, OBJECT, 200, object("3", &with_events(5), &BTreeMap::new())),
            checked(
                call(Method::PUT, OBJECT, 200, object("4", &with_events(6), &BTreeMap::new())),
                |sent| {
                    assert_eq!(sent["metadata"]["resourceVersion"], "3");
                    assert_eq!(sent["spec"]["baseline"]["events"], 6);
                },
            ),
        ]);
        let record = store
            .update(&key(), &mut |r| {
                r.baseline.events += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(record.baseline.events, 6);
        finish(&store, server);
    }

    #[test]
    fn an_object_deleted_since_the_read_is_created_again() {
        let (store, server) = scenario(vec![
            call(Method::GET, OBJECT, 200, object("7", &with_events(1), &BTreeMap::new())),
            call(Method::PUT, OBJECT, 404, not_found()),
            call(Method::GET, OBJECT, 404, not_found()),
            checked(call(Method::POST, COLLECTION, 201, Value::Null), |sent| {
                assert_eq!(sent["spec"]["baseline"]["events"], 1);
            }),
        ]);
        let record = store
            .update(&key(), &mut |r| {
                r.baseline.events += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(record.baseline.events, 1);
        finish(&store, server);
    }

    /// A build through the store: render_version reads the newest profile from the
    /// object it just read (no extra request), the new version's profile goes
    /// inline, the oldest versions go, the pinned one stays.
    #[test]
    fn a_new_version_prunes_to_keep_but_keeps_the_pinned_version() {
        let rs = [
            rendered(&["mmap"]),
            rendered(&["mmap", "brk"]),
            rendered(&["mmap", "brk", "socket"]),
        ];
        let mut record = WorkloadRecord::new(key());
        for s in ["mmap", "brk", "socket"] {
            record.baseline.syscalls.insert(s.into(), SyscallStats::default());
        }
        record.state.versions = rs.iter().enumerate().map(|(i, r)| meta(r, i as i64)).collect();
        record.state.pinned = Some(rs[0].version.clone());
        let profiles: BTreeMap<_, _> = rs.iter().map(|r| (r.version.clone(), r.profile.clone())).collect();
        let want_new = rendered(&["mmap", "brk", "socket", "flock"]);
        let pinned = rs[0].version.to_string();
        let newest_old = rs[2].version.to_string();
        let new = want_new.version.to_string();
        let log_of_new = want_new.profile.log_variant();
        let (store, server) = scenario(vec![
            call(Method::GET, OBJECT, 200, object("7", &record, &profiles)),
            checked(call(Method::PUT, OBJECT, 200, Value::Null), move |sent| {
                let versions: Vec<&str> = sent["spec"]["versions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v["version"].as_str().unwrap())
                    .collect();
                assert_eq!(versions, [pinned.as_str(), newest_old.as_str(), new.as_str()]);
                assert_eq!(sent["spec"]["activeVersion"], json!(pinned));
                let inline: SeccompProfile =
                    serde_json::from_value(sent["spec"]["versions"][2]["profile"].clone()).unwrap();
                assert_eq!(inline.version().to_string(), new);
            }),
        ]);
        let store = store.with_keep(2);
        let mut observed = Baseline::new(key());
        for s in ["socket", "flock"] {
            observed.syscalls.insert(
                s.into(),
                SyscallStats {
                    count: 1,
                    ..Default::default()
                },
            );
        }
        let runtime = RuntimeBase::select("runc").unwrap();
        let mut outcome = None;
        let r = store
            .update(&key(), &mut |rec| {
                rec.baseline.merge(&observed);
                outcome = Some(render_version(
                    &store,
                    rec,
                    &runtime,
                    "runc",
                    Arch::X86_64,
                    Timestamp::UNIX_EPOCH,
                )?);
                Ok(())
            })
            .unwrap();
        let outcome = outcome.unwrap();
        assert!(outcome.new_version);
        assert_eq!(outcome.rendered.version, want_new.version);
        assert_eq!(outcome.added, ["flock"]);
        assert_eq!(r.state.versions.len(), 3);
        assert_eq!(r.active().unwrap().version, rs[0].version);
        // Everything put or read is in the API server now (or pruned): the handle
        // keeps nothing, so a build over many workloads does not grow.
        assert!(store.profiles.lock().unwrap().is_empty());
        // The Log-mode variant is derived from the stored version, not stored.
        let stored_again = object(
            "8",
            &r,
            &BTreeMap::from([
                (rs[0].version.clone(), rs[0].profile.clone()),
                (rs[2].version.clone(), rs[2].profile.clone()),
                (want_new.version.clone(), want_new.profile.clone()),
            ]),
        );
        finish(&store, server);
        let (store, server) = scenario(vec![call(Method::GET, OBJECT, 200, stored_again)]);
        assert_eq!(store.profile(&key(), &log_of_new.version()).unwrap(), log_of_new);
        finish(&store, server);
    }

    #[test]
    fn fallback_set_and_clear_go_through_the_status_subresource() {
        let record = with_events(1);
        let mut in_fallback = record.clone();
        in_fallback.state.fallback = Some(Fallback {
            reason: "SIGSYS in checkout-7d9-x2".into(),
            since: Timestamp::from_second(1_750_000_000).unwrap(),
        });
        let mut crashed = object("5", &in_fallback, &BTreeMap::new());
        crashed["status"]["fallback"]["pod"] = json!("shop/checkout-7d9-x2");
        let (store, server) = scenario(vec![
            call(Method::GET, OBJECT, 200, object("4", &record, &BTreeMap::new())),
            checked(
                call(Method::PUT, STATUS, 200, object("5", &in_fallback, &BTreeMap::new())),
                |sent| {
                    assert_eq!(sent["metadata"]["resourceVersion"], "4");
                    assert_eq!(sent["status"]["fallback"]["reason"], "operator: crash loop");
                    assert_eq!(sent["status"]["observedGeneration"], 4);
                },
            ),
            call(Method::GET, OBJECT, 200, crashed),
            checked(
                call(Method::PUT, STATUS, 200, object("6", &record, &BTreeMap::new())),
                |sent| {
                    assert_eq!(sent["metadata"]["resourceVersion"], "5");
                    assert!(sent["status"].get("fallback").is_none(), "{sent}");
                },
            ),
        ]);
        store
            .update(&key(), &mut |r| {
                r.state.fallback = Some(Fallback {
                    reason: "operator: crash loop".into(),
                    since: Timestamp::UNIX_EPOCH,
                });
                Ok(())
            })
            .unwrap();
        let cleared = store
            .update(&key(), &mut |r| {
                assert_eq!(r.state.fallback.as_ref().unwrap().reason, "SIGSYS in checkout-7d9-x2");
                r.state.fallback = None;
                Ok(())
            })
            .unwrap();
        assert_eq!(cleared.state.fallback, None);
        finish(&store, server);
    }

    /// The spec is written, then the status write conflicts: only the status is
    /// retried, so the change (a count) is not applied twice.
    #[test]
    fn a_status_conflict_after_the_spec_write_does_not_repeat_the_change() {
        let mut after_spec = with_events(2);
        after_spec.state.approvals.insert("ptrace".into());
        let (store, server) = scenario(vec![
            call(Method::GET, OBJECT, 200, object("7", &with_events(1), &BTreeMap::new())),
            checked(
                call(Method::PUT, OBJECT, 200, object("8", &with_events(2), &BTreeMap::new())),
                |sent| {
                    assert_eq!(sent["metadata"]["resourceVersion"], "7");
                },
            ),
            checked(call(Method::PUT, STATUS, 409, conflict()), |sent| {
                assert_eq!(sent["metadata"]["resourceVersion"], "8");
            }),
            call(Method::GET, OBJECT, 200, object("9", &after_spec, &BTreeMap::new())),
            checked(
                call(Method::PUT, STATUS, 200, object("10", &after_spec, &BTreeMap::new())),
                |sent| {
                    assert_eq!(sent["metadata"]["resourceVersion"], "9");
                    assert_eq!(sent["status"]["fallback"]["reason"], "bad");
                    assert_eq!(sent["spec"]["baseline"]["events"], 2);
                },
            ),
        ]);
        let mut runs = 0;
        store
            .update(&key(), &mut |r| {
                runs += 1;
                r.baseline.events += 1;
                r.state.fallback = Some(Fallback {
                    reason: "bad".into(),
                    since: Timestamp::UNIX_EPOCH,
                });
                Ok(())
            })
            .unwrap();
        assert_eq!(runs, 1);
        finish(&store, server);
    }

    #[test]
    fn missing_crds_and_rbac_give_errors_that_say_what_to_do() {
        let unserved = status_body(
            404,
            "NotFound",
            "the server could not find the requested resource",
            None,
        );
        let (store, server) = scenario(vec![
            call(Method::GET, OBJECT, 404, unserved.clone()),
            call(Method::GET, ALL, 404, unserved),
            call(
                Method::GET,
                OBJECT,
                403,
                status_body(
                    403,
                    "Forbidden",
                    "workloadprofiles.tether.dev is forbidden: User \"ci\" cannot get resource",
                    None,
                ),
            ),
        ]);
        let err = store.record(&key()).unwrap_err();
        assert!(matches!(err, StoreError::CrdsNotInstalled { .. }), "{err:?}");
        assert!(err.to_string().contains("kubectl apply -f deploy/base/crds"), "{err}");
        let err = store.keys().unwrap_err();
        assert!(matches!(err, StoreError::CrdsNotInstalled { .. }), "{err:?}");
        let err = store.record(&key()).unwrap_err().to_string();
        assert!(
            err.contains("not allowed to get workloadprofile shop/deployment.checkout.app") && err.contains("Role"),
            "{err}"
        );
        finish(&store, server);
    }

    #[test]
    fn keys_generation_and_stamps_come_from_metadata_only_reads() {
        fn list(items: &[(&str, &str, &str)], cont: Option<&str>) -> Value {
            let items: Vec<Value> = items
                .iter()
                .map(|(ns, name, rv)| {
                    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                    "metadata": {"namespace": ns, "name": name, "resourceVersion": rv}})
                })
                .collect();
            let mut meta = json!({"resourceVersion": "100"});
            if let Some(c) = cont {
                meta["continue"] = json!(c);
            }
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": meta, "items": items})
        }
        let page1 = list(&[("shop", "deployment.checkout.app", "5")], Some("next"));
        let page2 = list(
            &[("kube-system", "daemonset.cilium.agent", "6"), ("shop", "no-dots", "1")],
            None,
        );
        let one = list(&[("shop", "deployment.checkout.app", "5")], None);
        let moved = list(&[("shop", "deployment.checkout.app", "9")], None);
        let meta = json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"namespace": "shop", "name": "deployment.checkout.app", "resourceVersion": "42"}});
        let (store, server) = scenario(vec![
            call(Method::GET, ALL, 200, page1),
            call(Method::GET, ALL, 200, page2),
            call(Method::GET, ALL, 200, one.clone()),
            call(Method::GET, ALL, 200, one),
            call(Method::GET, ALL, 200, moved),
            call(Method::GET, OBJECT, 200, meta),
            call(Method::GET, OBJECT, 404, not_found()),
        ]);
        let keys: Vec<String> = store.keys().unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(
            keys,
            ["kube-system/daemonset/cilium/agent", "shop/deployment/checkout/app"]
        );
        let (a, b, c) = (
            store.generation().unwrap(),
            store.generation().unwrap(),
            store.generation().unwrap(),
        );
        assert_eq!(a, b);
        assert_ne!(b, c);
        assert_eq!(store.record_stamp(&key()).unwrap().as_deref(), Some("42"));
        assert_eq!(store.record_stamp(&key()).unwrap(), None);
        finish(&store, server);
    }

    #[test]
    fn profiles_are_read_verified_and_log_variants_derived() {
        let r = rendered(&["mmap"]);
        let mut record = WorkloadRecord::new(key());
        record.state.versions.push(meta(&r, 0));
        let profiles = BTreeMap::from([(r.version.clone(), r.profile.clone())]);
        let good = object("3", &record, &profiles);
        let mut tampered = good.clone();
        tampered["spec"]["versions"][0]["profile"]["defaultAction"] = json!("SCMP_ACT_ALLOW");
        let (store, server) = scenario(vec![
            call(Method::GET, OBJECT, 200, good.clone()),
            call(Method::GET, OBJECT, 200, good),
            call(Method::GET, OBJECT, 200, tampered),
        ]);
        assert_eq!(store.profile(&key(), &r.version).unwrap(), r.profile);
        let log = r.profile.log_variant();
        assert_eq!(store.profile(&key(), &log.version()).unwrap(), log);
        let err = store.profile(&key(), &r.version).unwrap_err();
        assert!(matches!(err, StoreError::InvalidObject { .. }), "{err:?}");
        assert!(err.to_string().contains("spec.versions[0].profile hashes to"), "{err}");
        finish(&store, server);
    }

    #[test]
    fn put_version_refuses_content_that_is_not_its_version() {
        let (store, server) = scenario(vec![]);
        let mut r = rendered(&["mmap"]);
        r.version = rendered(&["brk"]).version;
        let err = store.put_version(&key(), &r).unwrap_err();
        assert!(matches!(err, StoreError::VersionMismatch { .. }), "{err:?}");
        finish(&store, server);
    }

    #[test]
    fn inside_an_async_runtime_it_refuses_instead_of_panicking() {
        let (store, server) = scenario(vec![]);
        let err = store
            .runtime
            .get()
            .unwrap()
            .block_on(async { store.record(&key()) })
            .unwrap_err();
        assert!(matches!(err, StoreError::InsideAsyncRuntime), "{err:?}");
        finish(&store, server);
        // Dropping the store (and its runtime) inside a runtime does not panic.
        let outer = tokio::runtime::Builder::new_current_thread().build().unwrap();
        outer.block_on(async move { drop(store) });
    }

    #[test]
    fn object_names_round_trip_and_refuse_what_tether_cannot_write() {
        let k: WorkloadKey = "shop/statefulset/db.v2/main".parse().unwrap();
        let name = object_name(&k).unwrap();
        assert_eq!(name, "statefulset.db.v2.main");
        assert_eq!(WorkloadProfile::key_of_name("shop", &name), Some(k));
        for bad in [
            "nodots",
            "deployment.app",
            "Deployment.app.c",
            "deployment..c",
            ".app.c",
        ] {
            assert_eq!(WorkloadProfile::key_of_name("shop", bad), None, "{bad}");
        }
        let long = WorkloadKey::new("shop", "deployment", &format!("{0}.{0}.{0}.{0}", "a".repeat(60)), "c").unwrap();
        assert!(matches!(object_name(&long), Err(StoreError::ObjectName { .. })));
    }

    #[test]
    fn prune_keeps_the_newest_and_the_pinned_version() {
        let rs: Vec<Rendered> = ["mmap", "brk", "socket", "flock"]
            .iter()
            .map(|s| rendered(&[s]))
            .collect();
        let mut record = WorkloadRecord::new(key());
        record.state.versions = rs.iter().enumerate().map(|(i, r)| meta(r, i as i64)).collect();
        let names = |r: &WorkloadRecord| r.state.versions.iter().map(|v| v.version.clone()).collect::<Vec<_>>();
        let mut unpinned = record.clone();
        prune(&mut unpinned, 2);
        assert_eq!(names(&unpinned), [rs[2].version.clone(), rs[3].version.clone()]);
        record.state.pinned = Some(rs[1].version.clone());
        prune(&mut record, 2);
        assert_eq!(
            names(&record),
            [rs[1].version.clone(), rs[2].version.clone(), rs[3].version.clone()]
        );
        assert_eq!(record.active().unwrap().version, rs[1].version);
        prune(&mut record, 0);
        assert_eq!(names(&record), [rs[1].version.clone(), rs[3].version.clone()]);
    }

    #[test]
    fn an_object_of_another_workload_is_refused() {
        let record = with_events(1);
        let mut spec = spec_from_record(&record, &BTreeMap::new()).unwrap();
        spec.workload.container = "sidecar".into();
        let err = record_from_object(&key(), &spec, None).unwrap_err().to_string();
        assert!(err.contains("spec.workload is deployment/checkout/sidecar"), "{err}");
    }

    const NAMES: &[&str] = &["read", "mmap", "brk", "socket", "flock", "ptrace", "bind", "clone3"];

    fn time_strategy() -> impl Strategy<Value = Option<Timestamp>> {
        proptest::option::of(
            (0i64..4_000_000_000, 0i32..1_000_000_000).prop_map(|(s, n)| Timestamp::new(s, n).unwrap()),
        )
    }

    fn record_strategy() -> impl Strategy<Value = (WorkloadRecord, BTreeMap<Version, SeccompProfile>)> {
        let stats = (0u64..1_000_000, time_strategy(), time_strategy()).prop_map(|(count, first_seen, last_seen)| {
            SyscallStats {
                count,
                first_seen,
                last_seen,
            }
        });
        (
            proptest::collection::btree_map(proptest::sample::select(NAMES), stats, 0..6),
            proptest::collection::btree_set("[a-z0-9-]{1,12}", 0..4),
            proptest::collection::btree_set("[a-z0-9.-]{1,12}", 0..3),
            proptest::collection::btree_set(
                proptest::sample::select(vec![Abi::X86_64, Abi::I386, Abi::Aarch64, Abi::Arm]),
                0..4,
            ),
            proptest::array::uniform6(0u64..u64::MAX),
            (time_strategy(), time_strategy()),
            proptest::collection::vec(
                (
                    proptest::collection::btree_set(proptest::sample::select(NAMES), 1..5),
                    any::<bool>(),
                    any::<bool>(),
                ),
                0..4,
            ),
            (
                any::<Option<prop::sample::Index>>(),
                proptest::collection::btree_set(proptest::sample::select(&["ptrace", "bpf", "mount"][..]), 0..3),
            ),
            proptest::option::of(("[ -~]{0,40}", time_strategy())),
        )
            .prop_map(
                |(
                    syscalls,
                    pods,
                    nodes,
                    abis,
                    counters,
                    (window_start, window_end),
                    versions,
                    (pin, approvals),
                    fallback,
                )| {
                    let mut record = WorkloadRecord::new(key());
                    let b = &mut record.baseline;
                    b.syscalls = syscalls.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                    b.pods = pods;
                    b.nodes = nodes;
                    b.abis = abis;
                    [
                        b.events,
                        b.processes,
                        b.exits,
                        b.exec_probe_events,
                        b.excluded.not_in_init_tree,
                        b.dropped_on_nodes,
                    ] = counters;
                    b.window_start = window_start;
                    b.window_end = window_end;
                    let mut profiles = BTreeMap::new();
                    for (i, (names, validated, arm)) in versions.into_iter().enumerate() {
                        let names: Vec<&str> = names.into_iter().collect();
                        let r = rendered(&names);
                        if profiles.insert(r.version.clone(), r.profile.clone()).is_some() {
                            continue;
                        }
                        let mut m = meta(&r, i as i64);
                        m.status = if validated {
                            VersionStatus::Validated
                        } else {
                            VersionStatus::Draft
                        };
                        m.arch = if arm { Arch::Aarch64 } else { Arch::X86_64 };
                        m.needs_review = names
                            .iter()
                            .filter(|n| **n == "ptrace")
                            .map(|n| n.to_string())
                            .collect();
                        record.state.versions.push(m);
                    }
                    record.state.pinned = pin
                        .filter(|_| !record.state.versions.is_empty())
                        .map(|i| i.get(&record.state.versions).version.clone());
                    record.state.approvals = approvals.into_iter().map(String::from).collect();
                    record.state.fallback = fallback.map(|(reason, since)| Fallback {
                        reason,
                        since: since.unwrap_or(Timestamp::UNIX_EPOCH),
                    });
                    (record, profiles)
                },
            )
    }

    proptest! {
        /// Record -> object -> (JSON, as the API server stores it) -> record is the
        /// identity, for every field; and the object's active version (what the
        /// webhook and the installer read) is the record's (what `profiles list`
        /// shows), Draft or Validated, pinned or not.
        #[test]
        fn records_round_trip_through_workload_profiles((record, profiles) in record_strategy()) {
            let mut wp = WorkloadProfile::new("deployment.checkout.app", spec_from_record(&record, &profiles).unwrap());
            prop_assert_eq!(
                wp.spec.active().map(|v| v.version.clone()),
                record.active().map(|m| m.version.to_string())
            );
            wp.status = Some(WorkloadProfileStatus {
                fallback: record.state.fallback.as_ref().map(fallback_state),
                observed_generation: None,
            });
            let wire: WorkloadProfile = serde_json::from_slice(&serde_json::to_vec(&wp).unwrap()).unwrap();
            let (back, back_profiles) = record_from_object(&key(), &wire.spec, wire.status.as_ref()).unwrap();
            prop_assert_eq!(&back, &record);
            prop_assert_eq!(back_profiles, profiles);
        }
    }
}
