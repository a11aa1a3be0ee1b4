//! The profile store: baselines, immutable content-addressed profile versions, and
//! per-workload state. [`FsStore`] is the embedded default.

use crate::baseline::Baseline;
use crate::key::WorkloadKey;
use crate::render::{Arch, RenderOptions, Rendered, RuntimeBase, SeccompProfile, Version, render};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The on-disk format version of [`FsStore`].
pub const FORMAT: u32 = 1;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A stored file does not parse. Nothing is overwritten while this stands.
    #[error("{path} is corrupt ({source}); restore it from a backup or move it away, then retry")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error (with line and column).
        source: serde_json::Error,
    },
    /// A version file's content does not match its name.
    #[error("{path} does not hash to its version {version}: the file was altered; restore it from a backup")]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// The version it should have.
        version: Version,
    },
    /// The directory is not a tether store.
    #[error("{path} is not a tether store: {reason}")]
    NotAStore {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The store has no record of the workload.
    #[error("no workload {key} in the store; `tether profiles list` shows the workloads it has")]
    UnknownWorkload {
        /// The key.
        key: WorkloadKey,
    },
    /// The workload has no such version.
    #[error("workload {key} has no version {version}; `tether profiles show {key} --json` lists its versions")]
    UnknownVersion {
        /// The key.
        key: WorkloadKey,
        /// The version asked for.
        version: Version,
    },
    /// A caller-side check inside an update refused the change.
    #[error("{0}")]
    Refused(String),
    /// A profile was put under a version it does not hash to: versions are
    /// content-addressed, so one version can never hold other content.
    #[error(
        "a profile put as version {version} of {key} hashes to {actual}: a version is the hash of its profile and is never rewritten; render the profile again"
    )]
    VersionMismatch {
        /// The key (boxed: the error stays small on every path that never fails).
        key: Box<WorkloadKey>,
        /// The version it was put as.
        version: Version,
        /// The version its content has.
        actual: Version,
    },
    /// The key's `WorkloadProfile` name would be too long for the API server.
    #[error(
        "{key} needs the object name {name}, longer than the 253 characters Kubernetes allows; shorten the workload or container name"
    )]
    ObjectName {
        /// The key (boxed, as in `VersionMismatch`).
        key: Box<WorkloadKey>,
        /// The name it would have.
        name: String,
    },
    /// A `WorkloadProfile` holds something tether could not have written.
    /// Nothing is overwritten while this stands.
    #[error("{object} is invalid: {reason}; fix it with `kubectl edit`, or delete it and run `tether build` again")]
    InvalidObject {
        /// The object (`workloadprofile <namespace>/<name>`).
        object: String,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// A Kubernetes store method was called from inside an async runtime, where
    /// blocking on the request would stall the runtime's thread.
    #[error(
        "the Kubernetes store blocks on its requests and was called from inside an async runtime; call it from a plain thread (e.g. tokio::task::spawn_blocking)"
    )]
    InsideAsyncRuntime,
    /// The runtime that drives the Kubernetes client could not start.
    #[error("cannot start the Kubernetes client's runtime thread: {source}")]
    Runtime {
        /// Why.
        source: io::Error,
    },
    /// No usable Kubernetes client configuration.
    #[error("no Kubernetes client configuration ({reason}); set KUBECONFIG or run in a pod with a service account")]
    KubeConfig {
        /// What the client said.
        reason: String,
    },
    /// The API server does not serve `workloadprofiles.tether.dev/v1alpha1`.
    #[error(
        "the API server does not serve workloadprofiles.tether.dev/v1alpha1 ({message}); install the CRDs: `kubectl apply -f deploy/base/crds` (or `tether crds | kubectl apply -f -`)"
    )]
    CrdsNotInstalled {
        /// What the API server said.
        message: String,
    },
    /// The API server refused the identity tether runs as.
    #[error(
        "not allowed to {verb} {object} ({message}); grant this identity {verb} on workloadprofiles.tether.dev (and workloadprofiles/status for fallbacks) with a Role or ClusterRole, as deploy/base/webhook/rbac.yaml does for the webhook"
    )]
    Forbidden {
        /// What was attempted (`get`, `update`, ...).
        verb: &'static str,
        /// The object or collection.
        object: String,
        /// What the API server said.
        message: String,
    },
    /// The API server did not accept the credentials.
    #[error(
        "the API server rejected the credentials ({message}); check the kubeconfig's user or the service account token"
    )]
    Unauthorized {
        /// What the API server said.
        message: String,
    },
    /// Other writers changed the object on every attempt.
    #[error(
        "{object} changed under every one of {attempts} attempts to update it (409 Conflict); retry, and look for a writer that rewrites it in a loop"
    )]
    Conflict {
        /// The object.
        object: String,
        /// How many read-change-write rounds were tried.
        attempts: usize,
    },
    /// The API server refused a request for another reason.
    #[error("cannot {verb} {object}: the API server answered {code}: {message}")]
    Api {
        /// What was attempted.
        verb: &'static str,
        /// The object or collection.
        object: String,
        /// The HTTP status.
        code: u16,
        /// What the API server said.
        message: String,
    },
    /// The API server could not be reached or answered something unreadable.
    #[cfg(feature = "kube")]
    #[error("cannot {verb} {object}: {}; check that the API server in the kubeconfig is reachable", chain(.cause.as_ref()))]
    Kube {
        /// What was attempted.
        verb: &'static str,
        /// The object or collection.
        object: String,
        /// The client's error (in the message, not a `source`: reporters that
        /// print the chain would print it twice).
        cause: Box<kube::Error>,
    },
}

/// An error and its causes on one line: the kube client's own message often
/// leaves out the cause that matters ("Connection refused").
#[cfg(feature = "kube")]
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        // Wrappers often repeat their cause's message; say each part once.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// Where a version stands on its way to enforcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionStatus {
    /// Rendered from a baseline, not yet proven by replay.
    Draft,
    /// Replayed in staging without breaking the workload.
    Validated,
}

/// What the store keeps about one version besides its profile file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMeta {
    /// The version.
    pub version: Version,
    /// When it was rendered.
    pub created: Timestamp,
    /// The runtime base set it includes (`runc@1.1+1.2`).
    pub runtime: String,
    /// The node architecture it is for.
    pub arch: Arch,
    /// How many syscalls it allows.
    pub allowed: usize,
    /// Observed dangerous syscalls it leaves out until approved.
    pub needs_review: Vec<String>,
    /// Draft or Validated.
    pub status: VersionStatus,
}

/// Why and since when a workload runs under its fallback instead of its profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fallback {
    /// The reason, as given by the operator or the crash watcher.
    pub reason: String,
    /// Since when.
    pub since: Timestamp,
}

/// Per-workload state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadState {
    /// The version `activate` pinned; without one, the newest version is active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<Version>,
    /// Dangerous syscalls an operator approved.
    #[serde(default)]
    pub approvals: BTreeSet<String>,
    /// Set while the workload is in fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// Versions, oldest first.
    #[serde(default)]
    pub versions: Vec<VersionMeta>,
}

/// Everything the store knows about one workload container except the profile files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    /// The file format version.
    pub format: u32,
    /// The merged baseline.
    pub baseline: Baseline,
    /// The state.
    pub state: WorkloadState,
}

impl WorkloadRecord {
    /// A record with an empty baseline.
    pub fn new(key: WorkloadKey) -> Self {
        WorkloadRecord {
            format: FORMAT,
            baseline: Baseline::new(key),
            state: WorkloadState::default(),
        }
    }

    /// The key.
    pub fn key(&self) -> &WorkloadKey {
        &self.baseline.key
    }

    /// The active version: the pinned one, else the newest (see [`active_position`]).
    pub fn active(&self) -> Option<&VersionMeta> {
        let pinned = self.state.pinned.as_ref();
        active_position(
            &self.state.versions,
            pinned.map(|p| move |v: &VersionMeta| &v.version == p),
        )
        .map(|i| &self.state.versions[i])
    }

    /// The newest version.
    pub fn latest(&self) -> Option<&VersionMeta> {
        self.state.versions.last()
    }

    /// Metadata of `version`.
    pub fn version(&self, version: &Version) -> Option<&VersionMeta> {
        self.state.versions.iter().find(|v| &v.version == version)
    }
}

/// Which of `versions` (oldest first) is active: the pinned one, else the newest.
/// `is_pinned` picks the pinned version out, `None` when nothing is pinned.
///
/// The one rule for every store and reader: [`WorkloadRecord::active`] (FsStore,
/// KubeStore) and `WorkloadProfileSpec::active` (the webhook's Kubernetes index,
/// the node installer, the crash watcher) both come here, so a pod is injected the
/// version `tether profiles list` shows as active whichever store is used. A
/// newer Draft is active too: validation is a step an operator runs, not a gate
/// admission applies. `None` when there are no versions, or the pin names a
/// version no longer kept (nothing is injected rather than a version nobody chose).
pub fn active_position<T>(versions: &[T], is_pinned: Option<impl Fn(&T) -> bool>) -> Option<usize> {
    match is_pinned {
        Some(pinned) => versions.iter().position(pinned),
        None => versions.len().checked_sub(1),
    }
}

/// Storage for baselines, profile versions and workload state.
///
/// Guarantees: a version, once stored, is never rewritten (content-addressed);
/// [`ProfileStore::update`] is an atomic read-modify-write of one workload's record
/// with respect to other writers.
pub trait ProfileStore {
    /// Every workload with a record, sorted.
    fn keys(&self) -> Result<Vec<WorkloadKey>, StoreError>;
    /// The record of `key`, if any.
    fn record(&self, key: &WorkloadKey) -> Result<Option<WorkloadRecord>, StoreError>;
    /// A cheap token that changes whenever the record of `key` changes (`None`:
    /// no record, or the store cannot tell). Readers that keep a copy of a record
    /// re-read it only when its stamp differs, so an unchanged store costs a
    /// `stat` per workload rather than a read and a parse.
    fn record_stamp(&self, key: &WorkloadKey) -> Result<Option<String>, StoreError> {
        let _ = key;
        Ok(None)
    }
    /// A token that changes after every write through this trait (`None`: the
    /// store cannot tell, so readers must look at everything). Read it before
    /// reading the store: a write that lands after it changes it again.
    fn generation(&self) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
    /// The profile of `version`, verified against its hash.
    fn profile(&self, key: &WorkloadKey, version: &Version) -> Result<SeccompProfile, StoreError>;
    /// Stores a rendered version's profile; a no-op when it is already there.
    fn put_version(&self, key: &WorkloadKey, rendered: &Rendered) -> Result<(), StoreError>;
    /// Stores several versions of one workload (a profile and its Log-mode
    /// variant); each is a no-op when already there. Stores may make them durable
    /// together, but every one is durable when this returns.
    fn put_versions(&self, key: &WorkloadKey, versions: &[&Rendered]) -> Result<(), StoreError> {
        versions.iter().try_for_each(|r| self.put_version(key, r))
    }
    /// Runs `f` on the record of `key` (a new empty one when absent) under the write
    /// lock and stores the result; when `f` fails, nothing is written.
    fn update(
        &self,
        key: &WorkloadKey,
        f: &mut dyn FnMut(&mut WorkloadRecord) -> Result<(), StoreError>,
    ) -> Result<WorkloadRecord, StoreError>;
}

/// The embedded store: a directory.
///
/// ```text
/// DIR/tether-store.json                          {"format": 1}
/// DIR/workloads/<ns>/<kind>/<name>/<container>/.lock  a writer of that workload holds it
/// DIR/workloads/<ns>/<kind>/<name>/<container>/record.json
/// DIR/workloads/<ns>/<kind>/<name>/<container>/versions/<version>.json
/// ```
///
/// Every write goes to a temporary file in the same directory, is fsynced, renamed
/// over the target, and the directory is fsynced: readers see the old or the new
/// file, never a partial one, and a crash loses at most the write in flight.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

const MARKER: &str = "tether-store.json";

/// Rewritten after every write (see [`ProfileStore::generation`]): readers that
/// poll compare one small file instead of walking 10,000 workload directories.
const GENERATION: &str = "generation";

#[derive(Serialize, Deserialize)]
struct Marker {
    format: u32,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl FsStore {
    /// Opens the store at `root`, creating it when the directory is absent or empty.
    pub fn open_or_create(root: &Path) -> Result<FsStore, StoreError> {
        let marker = root.join(MARKER);
        if !marker.exists() {
            fs::create_dir_all(root).map_err(io_err(root))?;
            // A creation killed before its marker was renamed into place leaves
            // only a temporary file: that directory is still ours to create in.
            let has_files = fs::read_dir(root)
                .map_err(io_err(root))?
                .filter_map(Result::ok)
                .any(|e| !is_temp(&e.file_name()));
            if has_files {
                return Err(StoreError::NotAStore {
                    path: root.to_path_buf(),
                    reason: format!("the directory is not empty and has no {MARKER}; choose an empty or new directory"),
                });
            }
            let bytes = serde_json::to_vec(&Marker { format: FORMAT }).unwrap_or_default();
            write_atomic(&marker, &bytes)?;
        }
        FsStore::open(root)
    }

    /// Opens an existing store.
    pub fn open(root: &Path) -> Result<FsStore, StoreError> {
        let marker = root.join(MARKER);
        let bytes = fs::read(&marker).map_err(|e| StoreError::NotAStore {
            path: root.to_path_buf(),
            reason: format!(
                "cannot read {} ({e}); create one with `tether build --store {}`",
                marker.display(),
                root.display()
            ),
        })?;
        let m: Marker = serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
            path: marker.clone(),
            source,
        })?;
        if m.format != FORMAT {
            return Err(StoreError::NotAStore {
                path: root.to_path_buf(),
                reason: format!("format {} is not the format {FORMAT} this tether reads", m.format),
            });
        }
        // The generation is bumped without any lock, by every writer: its
        // leftovers can only be collected by age, and every process that opens
        // the store does it (the root holds a handful of entries).
        remove_stale_temps(root);
        Ok(FsStore {
            root: root.to_path_buf(),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, key: &WorkloadKey) -> PathBuf {
        self.root.join("workloads").join(key.rel_path())
    }

    /// The path of a version's profile file.
    pub fn version_path(&self, key: &WorkloadKey, version: &Version) -> PathBuf {
        self.dir(key).join("versions").join(format!("{version}.json"))
    }

    fn record_path(&self, key: &WorkloadKey) -> PathBuf {
        self.dir(key).join("record.json")
    }

    /// Locks one workload's record for writing. Workloads have nothing in common on
    /// disk, so writers of different workloads (a build updating hundreds of them)
    /// proceed side by side, and their fsyncs overlap.
    fn lock(&self, key: &WorkloadKey) -> Result<File, StoreError> {
        let dir = self.dir(key);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        f.lock().map_err(io_err(&path))?;
        Ok(f)
    }

    /// Replaces the generation token with a new one. Not fsynced: it is a hint
    /// for pollers, and after a crash they start with a full load anyway.
    fn bump_generation(&self) -> Result<(), StoreError> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let token = format!(
            "{}.{:09}-{}-{}",
            now.as_secs(),
            now.subsec_nanos(),
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        replace_file(&self.root.join(GENERATION), token.as_bytes(), Durability::None)
    }
}

/// The name prefix of the temporary files [`write_atomic`] renames into place.
/// Nothing in the store reads them: a writer killed between creating one and
/// renaming it leaves it behind, and [`FsStore`] removes it later.
pub const TEMP_PREFIX: &str = ".tmp-";

/// Whether a directory entry is one of the store's temporary files.
pub fn is_temp(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| n.starts_with(TEMP_PREFIX))
}

/// Age after which a temporary file belongs to no live writer. A write takes
/// milliseconds; a temporary file that is still younger may be one a writer is
/// about to rename (a `put_versions` outside `update` holds no lock), so it is
/// left alone.
pub const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes the temporary files older than [`STALE_TEMP`] in `dir`: each write
/// interrupted by a crash leaves one, and without this they would pile up one
/// per crash for ever. Best effort: the write that triggers the sweep must not
/// fail because of a leftover, so failures are only logged.
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.filter_map(Result::ok) {
        if !is_temp(&entry.file_name()) {
            continue;
        }
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE_TEMP);
        if !stale {
            continue;
        }
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => tracing::debug!(path = %path.display(), "removed a temporary file a killed writer left"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale temporary file"),
        }
    }
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    replace_file(path, bytes, Durability::Durable)
}

/// What [`replace_file`] fsyncs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Nothing: a hint that may be lost in a crash.
    None,
    /// The file's data, before the rename; the caller fsyncs the directory.
    DataOnly,
    /// The file's data, then its directory after the rename.
    Durable,
}

/// Writes `bytes` to a temporary file beside `path` and renames it over `path`:
/// readers see the old or the new file, never a partial one. [`Durability::Durable`]
/// fsyncs the file and then its directory, so the new file survives a crash.
fn replace_file(path: &Path, bytes: &[u8], durability: Durability) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    tmp.write_all(bytes).map_err(io_err(tmp.path()))?;
    if durability != Durability::None {
        tmp.as_file().sync_all().map_err(io_err(path))?;
    }
    tmp.persist(path).map_err(|e| StoreError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    if durability == Durability::Durable {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
    }
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

impl ProfileStore for FsStore {
    fn keys(&self) -> Result<Vec<WorkloadKey>, StoreError> {
        let mut keys = Vec::new();
        let base = self.root.join("workloads");
        if !base.exists() {
            return Ok(keys);
        }
        // namespace/kind/name/container: four levels of directories.
        let mut level: Vec<(PathBuf, Vec<String>)> = vec![(base, Vec::new())];
        for _ in 0..4 {
            let mut next = Vec::new();
            for (dir, parts) in level {
                for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
                    let entry = entry.map_err(io_err(&dir))?;
                    if !entry.file_type().map_err(io_err(&dir))?.is_dir() {
                        continue;
                    }
                    let mut parts = parts.clone();
                    parts.push(entry.file_name().to_string_lossy().into_owned());
                    next.push((entry.path(), parts));
                }
            }
            level = next;
        }
        for (dir, parts) in level {
            if !dir.join("record.json").exists() {
                continue;
            }
            match WorkloadKey::new(&parts[0], &parts[1], &parts[2], &parts[3]) {
                Ok(k) => keys.push(k),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "skipping a directory that is not a workload key")
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    fn record(&self, key: &WorkloadKey) -> Result<Option<WorkloadRecord>, StoreError> {
        read_json(&self.record_path(key))
    }

    /// Inode, size and modification time of `record.json`: every update renames a
    /// new file over it, so the inode changes even when size and time do not.
    fn record_stamp(&self, key: &WorkloadKey) -> Result<Option<String>, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let path = self.record_path(key);
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(format!(
                "{}:{}:{}.{}",
                m.ino(),
                m.len(),
                m.mtime(),
                m.mtime_nsec()
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn profile(&self, key: &WorkloadKey, version: &Version) -> Result<SeccompProfile, StoreError> {
        let path = self.version_path(key, version);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::UnknownVersion {
                key: key.clone(),
                version: version.clone(),
            },
            _ => io_err(&path)(e),
        })?;
        if &Version::of(&bytes) != version {
            return Err(StoreError::HashMismatch {
                path,
                version: version.clone(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt { path, source })
    }

    fn put_version(&self, key: &WorkloadKey, rendered: &Rendered) -> Result<(), StoreError> {
        self.put_versions(key, &[rendered])
    }

    fn put_versions(&self, key: &WorkloadKey, versions: &[&Rendered]) -> Result<(), StoreError> {
        // The files share a directory: each file's data is fsynced before its
        // rename, and one fsync of the directory then makes every rename durable
        // (a build writes two files per new version for hundreds of workloads;
        // this saves one directory fsync each).
        let mut written = false;
        for rendered in versions {
            let path = self.version_path(key, &rendered.version);
            if path.exists() {
                // Content-addressed: an intact file already holds these bytes.
                self.profile(key, &rendered.version)?;
                continue;
            }
            replace_file(&path, &rendered.profile.canonical_json(), Durability::DataOnly)?;
            written = true;
        }
        if written {
            let dir = self.dir(key).join("versions");
            File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err(&dir))?;
            self.bump_generation()?;
        }
        Ok(())
    }

    fn update(
        &self,
        key: &WorkloadKey,
        f: &mut dyn FnMut(&mut WorkloadRecord) -> Result<(), StoreError>,
    ) -> Result<WorkloadRecord, StoreError> {
        let _lock = self.lock(key)?;
        // Under the lock no other writer of this workload is at work, so this is
        // where a killed writer's leftovers in its directories are collected.
        let dir = self.dir(key);
        remove_stale_temps(&dir);
        remove_stale_temps(&dir.join("versions"));
        let path = self.record_path(key);
        let mut record = read_json(&path)?.unwrap_or_else(|| WorkloadRecord::new(key.clone()));
        let before = record.clone();
        f(&mut record)?;
        if record != before {
            let bytes = serde_json::to_vec_pretty(&record).map_err(|source| StoreError::Corrupt {
                path: path.clone(),
                source,
            })?;
            write_atomic(&path, &bytes)?;
            self.bump_generation()?;
        }
        Ok(record)
    }

    fn generation(&self) -> Result<Option<String>, StoreError> {
        let path = self.root.join(GENERATION);
        match fs::read_to_string(&path) {
            Ok(token) => Ok(Some(token)),
            // A store no writer has touched since this was added.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }
}

/// The `localhostProfile` of a version, relative to the kubelet's seccomp root:
/// `tether/<namespace>/<kind>/<name>/<container>-<version>.json`. Safe as a path:
/// every component of a key is validated.
pub fn localhost_profile(key: &WorkloadKey, version: &Version) -> String {
    // Joined by hand into one exact allocation: admission builds one per
    // container of every pod, and `format!` took ~0.3 µs of each.
    let (ns, kind, name, container, version) = (
        key.namespace(),
        key.kind(),
        key.name(),
        key.container(),
        version.as_str(),
    );
    let mut path = String::with_capacity(
        "tether////-.json".len() + ns.len() + kind.len() + name.len() + container.len() + version.len(),
    );
    for part in [
        "tether/", ns, "/", kind, "/", name, "/", container, "-", version, ".json",
    ] {
        path.push_str(part);
    }
    path
}

/// One file a node holds for a version: its `localhostProfile` (the path under
/// the kubelet's seccomp root), its version and its canonical bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFile {
    /// `tether/<namespace>/<kind>/<name>/<container>-<version>.json`.
    pub localhost_profile: String,
    /// The version the bytes hash to.
    pub version: Version,
    /// The canonical profile JSON.
    pub bytes: Vec<u8>,
}

/// The files a node needs so that every pod of `key` admitted with `profile` can
/// start: the profile itself and its Log-mode variant (what a workload in
/// fallback gets where Pod Security forbids `Unconfined`). The webhook injects
/// exactly these `localhostProfile` paths.
pub fn node_files(key: &WorkloadKey, profile: &SeccompProfile) -> [NodeFile; 2] {
    let file = |p: &SeccompProfile| {
        let bytes = p.canonical_json();
        let version = Version::of(&bytes);
        NodeFile {
            localhost_profile: localhost_profile(key, &version),
            version,
            bytes,
        }
    };
    [file(profile), file(&profile.log_variant())]
}

/// The key and version a `localhostProfile` under `tether/` names; `None` for a
/// path that [`localhost_profile`] could not have produced (including any `..`).
pub fn parse_localhost_profile(path: &str) -> Option<(WorkloadKey, Version)> {
    let rest = path.strip_prefix("tether/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [ns, kind, name, file] = parts.as_slice() else {
        return None;
    };
    let (container, version) = file.strip_suffix(".json")?.rsplit_once('-')?;
    let key = WorkloadKey::new(ns, kind, name, container).ok()?;
    // Kinds are lower case in paths; reject other spellings rather than alias them.
    (key.kind() == *kind).then_some(())?;
    Some((key, version.parse().ok()?))
}

/// What [`render_version`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderOutcome {
    /// The profile rendered from the baseline.
    pub rendered: Rendered,
    /// Whether it is a new version (its allowed set, runtime or architecture
    /// changed); when false the newest stored version already is this profile.
    pub new_version: bool,
    /// Syscalls allowed now but not by the previous newest version.
    pub added: Vec<String>,
    /// Syscalls the previous newest version allowed and this one does not.
    pub removed: Vec<String>,
}

/// Renders `record`'s baseline with its approvals and, when the result differs from
/// the newest version, stores the profile and appends a Draft version.
///
/// Call it inside [`ProfileStore::update`] so that the record and the version list
/// change together. `runtime_spec` is what the operator chose (`runc`, `crun@1`),
/// recorded so later re-renders (approvals) use the same base set.
pub fn render_version(
    store: &dyn ProfileStore,
    record: &mut WorkloadRecord,
    runtime: &RuntimeBase,
    runtime_spec: &str,
    arch: Arch,
    now: Timestamp,
) -> Result<RenderOutcome, StoreError> {
    let opts = RenderOptions {
        runtime: runtime.clone(),
        arch,
        approvals: record.state.approvals.clone(),
    };
    let rendered = render(record.baseline.syscall_names(), &opts);
    let key = record.key().clone();
    let previous = match record.latest() {
        Some(meta) => Some(store.profile(&key, &meta.version)?),
        None => None,
    };
    let now_allowed = rendered.profile.allowed();
    let before: BTreeSet<&str> = previous.as_ref().map(SeccompProfile::allowed).unwrap_or_default();
    let added = now_allowed.difference(&before).map(|s| s.to_string()).collect();
    let removed = before.difference(&now_allowed).map(|s| s.to_string()).collect();
    let new_version = record.latest().map(|m| &m.version) != Some(&rendered.version);
    if new_version {
        // The Log-mode variant is what a workload in fallback runs under where Pod
        // Security forbids Unconfined: keep it beside the profile, so whatever
        // installs profiles on nodes finds both.
        let log = rendered.profile.log_variant();
        let log = Rendered {
            version: log.version(),
            profile: log,
            needs_review: Vec::new(),
        };
        store.put_versions(&key, &[&rendered, &log])?;
        // A version seen before (e.g. after an approval was revoked) moves to the end
        // as the newest rather than appearing twice.
        record.state.versions.retain(|v| v.version != rendered.version);
        record.state.versions.push(VersionMeta {
            version: rendered.version.clone(),
            created: now,
            runtime: runtime_spec.to_string(),
            arch,
            allowed: now_allowed.len(),
            needs_review: rendered.needs_review.clone(),
            status: VersionStatus::Draft,
        });
    }
    Ok(RenderOutcome {
        rendered,
        new_version,
        added,
        removed,
    })
}

/// [`render_version`] with the runtime and architecture of the newest version
/// (`runc` and this host's architecture when there is none yet): how approvals and
/// staging lessons re-render a workload the way its builds did.
pub fn rerender(
    store: &dyn ProfileStore,
    record: &mut WorkloadRecord,
    now: Timestamp,
) -> Result<RenderOutcome, StoreError> {
    let (spec, arch) = record
        .latest()
        .map_or(("runc".to_string(), Arch::host()), |m| (m.runtime.clone(), m.arch));
    let runtime = RuntimeBase::select(&spec).map_err(|e| StoreError::Refused(e.to_string()))?;
    render_version(store, record, &runtime, &spec, arch, now)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn key() -> WorkloadKey {
        "ns/deployment/app/c".parse().unwrap()
    }

    /// `names` rendered for runc on x86_64 (shared with the KubeStore tests).
    pub(crate) fn rendered(names: &[&str]) -> Rendered {
        render(
            names.iter().copied(),
            &RenderOptions {
                runtime: RuntimeBase::select("runc").unwrap(),
                arch: Arch::X86_64,
                approvals: BTreeSet::new(),
            },
        )
    }

    #[test]
    fn localhost_paths_round_trip_and_reject_everything_else() {
        let r = rendered(&["read"]);
        let path = localhost_profile(&key(), &r.version);
        assert_eq!(path, format!("tether/ns/deployment/app/c-{}.json", r.version));
        assert_eq!(path.capacity(), path.len(), "built in one exact allocation");
        assert_eq!(parse_localhost_profile(&path), Some((key(), r.version.clone())));
        let v = r.version.as_str();
        for bad in [
            format!("tether/ns/deployment/app/c-{v}"),
            format!("tether/ns/deployment/../c-{v}.json"),
            format!("tether/ns/Deployment/app/c-{v}.json"),
            format!("tether/ns/deployment/app/sub/c-{v}.json"),
            format!("other/ns/deployment/app/c-{v}.json"),
            "tether/ns/deployment/app/c-nothex.json".to_string(),
            format!("tether/../../etc/c-{v}.json"),
        ] {
            assert_eq!(parse_localhost_profile(&bad), None, "{bad}");
        }
    }

    #[test]
    fn create_then_open_and_refuse_foreign_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        FsStore::open_or_create(&root).unwrap();
        FsStore::open(&root).unwrap();
        let foreign = dir.path().join("home");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("notes.txt"), "mine").unwrap();
        let err = FsStore::open_or_create(&foreign).unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
        assert!(
            FsStore::open(&dir.path().join("missing"))
                .unwrap_err()
                .to_string()
                .contains("tether build --store")
        );
    }

    /// Pollers skip walking the store when this is unchanged: every write must
    /// move it, and a write that changes nothing must not.
    #[test]
    fn every_write_moves_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open_or_create(dir.path()).unwrap();
        assert_eq!(store.generation().unwrap(), None);
        store
            .update(&key(), &mut |r| {
                r.baseline.events = 1;
                Ok(())
            })
            .unwrap();
        let first = store.generation().unwrap();
        assert!(first.is_some());
        store.update(&key(), &mut |_| Ok(())).unwrap();
        assert_eq!(
            store.generation().unwrap(),
            first,
            "a write that changed nothing moved it"
        );
        store.put_version(&key(), &rendered(&["read"])).unwrap();
        let second = store.generation().unwrap();
        assert_ne!(second, first);
        store
            .update(&key(), &mut |r| {
                r.baseline.events = 2;
                Ok(())
            })
            .unwrap();
        assert_ne!(store.generation().unwrap(), second);
    }

    #[test]
    fn versions_are_immutable_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open_or_create(dir.path()).unwrap();
        let r = rendered(&["read"]);
        store.put_version(&key(), &r).unwrap();
        store.put_version(&key(), &r).unwrap();
        assert_eq!(store.profile(&key(), &r.version).unwrap(), r.profile);
        let path = store.version_path(&key(), &r.version);
        fs::write(
            &path,
            b"{\"defaultAction\":\"SCMP_ACT_ALLOW\",\"architectures\":[],\"syscalls\":[]}",
        )
        .unwrap();
        assert!(matches!(
            store.profile(&key(), &r.version),
            Err(StoreError::HashMismatch { .. })
        ));
        // A tampered file is not silently "fixed" either.
        assert!(store.put_version(&key(), &r).is_err());
    }

    #[test]
    fn update_is_not_written_when_the_closure_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open_or_create(dir.path()).unwrap();
        store
            .update(&key(), &mut |r| {
                r.state.approvals.insert("ptrace".into());
                Ok(())
            })
            .unwrap();
        let err = store.update(&key(), &mut |r| {
            r.state.approvals.clear();
            Err(StoreError::Refused("no".into()))
        });
        assert!(err.is_err());
        assert!(
            store
                .record(&key())
                .unwrap()
                .unwrap()
                .state
                .approvals
                .contains("ptrace")
        );
        assert_eq!(store.keys().unwrap(), vec![key()]);
    }

    #[test]
    fn a_corrupt_record_is_reported_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open_or_create(dir.path()).unwrap();
        let path = store.record_path(&key());
        store
            .update(&key(), &mut |r| {
                r.baseline.events = 1;
                Ok(())
            })
            .unwrap();
        fs::write(&path, b"{ not json").unwrap();
        let err = store.update(&key(), &mut |r| {
            r.baseline.events = 2;
            Ok(())
        });
        let msg = err.unwrap_err().to_string();
        assert!(
            msg.contains("record.json is corrupt") && msg.contains("line 1"),
            "{msg}"
        );
        assert_eq!(fs::read(&path).unwrap(), b"{ not json");
    }

    /// Creates a file named `name` in `dir`, last modified `age` ago.
    fn temp_file(dir: &Path, name: &str, age: std::time::Duration) -> PathBuf {
        fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        let f = File::create(&path).unwrap();
        f.set_modified(std::time::SystemTime::now() - age).unwrap();
        path
    }

    #[test]
    fn a_store_whose_creation_was_killed_before_the_marker_can_be_created() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        // What a kill between creating the marker's temporary file and renaming
        // it leaves behind.
        temp_file(&root, ".tmp-AbC123", std::time::Duration::ZERO);
        let store = FsStore::open_or_create(&root).unwrap();
        assert!(root.join(MARKER).exists());
        store.put_version(&key(), &rendered(&["read"])).unwrap();
    }

    #[test]
    fn stale_temporary_files_are_removed_and_fresh_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open_or_create(dir.path()).unwrap();
        let r = rendered(&["read"]);
        store
            .update(&key(), &mut |rec| {
                store.put_version(&key(), &r)?;
                rec.baseline.events += 1;
                Ok(())
            })
            .unwrap();
        let old = STALE_TEMP + std::time::Duration::from_secs(60);
        let young = std::time::Duration::from_secs(1);
        let workload = store.dir(&key());
        let versions = workload.join("versions");
        let mut stale = Vec::new();
        let mut fresh = Vec::new();
        for d in [dir.path(), &workload, &versions] {
            stale.push(temp_file(d, ".tmp-old", old));
            fresh.push(temp_file(d, ".tmp-new", young));
        }
        // An old file that is not a temporary file is not the store's to remove.
        let other = temp_file(&versions, "notes.txt", old);
        assert_eq!(store.keys().unwrap(), [key()]);

        // Opening sweeps the root; a write sweeps its workload's directories.
        let store = FsStore::open(dir.path()).unwrap();
        assert!(!stale[0].exists());
        assert!(stale[1].exists() && stale[2].exists());
        store
            .update(&key(), &mut |rec| {
                rec.baseline.events += 1;
                Ok(())
            })
            .unwrap();
        for p in &stale {
            assert!(!p.exists(), "{} should be gone", p.display());
        }
        for p in &fresh {
            assert!(p.exists(), "{} may belong to a live writer", p.display());
        }
        assert!(other.exists());
        assert_eq!(store.record(&key()).unwrap().unwrap().baseline.events, 2);
        store.profile(&key(), &r.version).unwrap();
    }

    #[test]
    fn concurrent_writers_lose_no_update() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open_or_create(dir.path()).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                let store = store.clone();
                s.spawn(move || {
                    for _ in 0..25 {
                        store
                            .update(&key(), &mut |r| {
                                r.baseline.events += 1;
                                Ok(())
                            })
                            .unwrap();
                    }
                });
            }
        });
        assert_eq!(store.record(&key()).unwrap().unwrap().baseline.events, 100);
        let leftovers: Vec<_> = fs::read_dir(store.dir(&key()))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
