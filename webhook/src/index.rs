//! The in-memory index admission reads: workload key -> active version and fallback
//! state. Built from the store off the request path and swapped whole, so admission
//! never touches disk or network.

use profile_store::store::{WorkloadRecord, node_files};
use profile_store::{ProfileStore, StoreError, Version, WorkloadKey};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

/// What admission needs to know about one workload container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The active version, if any.
    pub active: Option<Version>,
    /// The Log-mode variant of the active version (the fallback where Pod
    /// Security forbids Unconfined).
    pub log_variant: Option<Version>,
    /// Set while the workload is in fallback: the reason.
    pub fallback: Option<String>,
    /// Every version a pod may legitimately reference (all stored versions and
    /// their Log-mode variants).
    pub known: HashSet<Version>,
}

/// Answers admission's questions about workloads.
pub trait Lookup: Send + Sync {
    /// The entry of `key`, if the store has one.
    fn entry(&self, key: &WorkloadKey) -> Option<&Entry>;
}

/// An immutable snapshot of the store.
#[derive(Debug, Default)]
pub struct Index {
    // Shared with the next snapshot when the record is unchanged: a refresh of an
    // idle store copies pointers, not 10,000 version sets.
    entries: HashMap<WorkloadKey, Arc<Entry>>,
    /// The store's stamp of each record the entries were built from.
    stamps: HashMap<WorkloadKey, String>,
    /// When the snapshot was taken.
    pub loaded_at: Option<SystemTime>,
    /// How many versions it knows.
    pub versions: usize,
}

impl Lookup for Index {
    fn entry(&self, key: &WorkloadKey) -> Option<&Entry> {
        self.entries.get(key).map(|e| &**e)
    }
}

impl Index {
    /// An index over `entries` (for tests and embedding).
    pub fn from_entries(entries: impl IntoIterator<Item = (WorkloadKey, Entry)>) -> Index {
        Self::from_shared(entries.into_iter().map(|(k, e)| (k, Arc::new(e))).collect())
    }

    fn from_shared(entries: HashMap<WorkloadKey, Arc<Entry>>) -> Index {
        Index {
            versions: entries.values().map(|e| e.known.len()).sum(),
            entries,
            stamps: HashMap::new(),
            loaded_at: Some(SystemTime::now()),
        }
    }

    /// A snapshot of `entries`, each built from the source record with the given
    /// stamp (so the next build can reuse it, see [`Index::reusable`]).
    pub(crate) fn from_stamped(entries: HashMap<WorkloadKey, (Arc<Entry>, String)>) -> Index {
        let mut stamps = HashMap::with_capacity(entries.len());
        let entries = entries
            .into_iter()
            .map(|(key, (entry, stamp))| {
                stamps.insert(key.clone(), stamp);
                (key, entry)
            })
            .collect();
        let mut index = Index::from_shared(entries);
        index.stamps = stamps;
        index
    }

    /// The entry of `key` when it was built from a record with `stamp`: a rebuild
    /// shares it instead of building it again.
    pub(crate) fn reusable(&self, key: &WorkloadKey, stamp: &str) -> Option<Arc<Entry>> {
        (self.stamps.get(key).map(String::as_str) == Some(stamp))
            .then(|| self.entries.get(key).cloned())
            .flatten()
    }

    /// The shared entry of `key` (tests check that rebuilds share unchanged entries).
    #[cfg(test)]
    pub(crate) fn shared_entry(&self, key: &WorkloadKey) -> Option<&Arc<Entry>> {
        self.entries.get(key)
    }

    /// Workloads in fallback.
    pub fn in_fallback(&self) -> usize {
        self.entries.values().filter(|e| e.fallback.is_some()).count()
    }

    /// Builds a snapshot of `store`. A record whose stamp is the one `previous`
    /// was built from is not read again (with 10,000 workloads, re-reading every
    /// record on each poll cost ~225 ms of CPU, and every read woke the directory
    /// watch); Log-mode variants are computed from the active profiles, reusing
    /// `previous` for versions it already knows.
    pub fn load(store: &dyn ProfileStore, previous: Option<&Index>) -> Result<Index, StoreError> {
        let mut entries = HashMap::new();
        let mut stamps = HashMap::new();
        for key in store.keys()? {
            let stamp = store.record_stamp(&key)?;
            let before = previous.and_then(|p| p.entries.get(&key));
            let unchanged = stamp.is_some() && previous.and_then(|p| p.stamps.get(&key)) == stamp.as_ref();
            let entry = match before {
                Some(entry) if unchanged => entry.clone(),
                _ => {
                    let Some(record) = store.record(&key)? else { continue };
                    Arc::new(Self::entry_of(store, &key, &record, before.map(|e| &**e))?)
                }
            };
            if let Some(stamp) = stamp {
                stamps.insert(key.clone(), stamp);
            }
            entries.insert(key, entry);
        }
        let mut index = Index::from_shared(entries);
        index.stamps = stamps;
        Ok(index)
    }

    fn entry_of(
        store: &dyn ProfileStore,
        key: &WorkloadKey,
        record: &WorkloadRecord,
        previous: Option<&Entry>,
    ) -> Result<Entry, StoreError> {
        let active = record.active().map(|m| m.version.clone());
        let log_variant = match (&active, previous) {
            (Some(a), Some(p)) if p.active.as_ref() == Some(a) => p.log_variant.clone(),
            // The installer's second file for the version: the webhook references
            // exactly the files the nodes get.
            (Some(a), _) => {
                let [_, log] = node_files(key, &store.profile(key, a)?);
                Some(log.version)
            }
            (None, _) => None,
        };
        let mut known: HashSet<Version> = record.state.versions.iter().map(|v| v.version.clone()).collect();
        known.extend(log_variant.iter().cloned());
        Ok(Entry {
            active,
            log_variant,
            fallback: record.state.fallback.as_ref().map(|f| f.reason.clone()),
            known,
        })
    }
}

/// The index in service, swapped atomically when the store changes.
#[derive(Debug, Default)]
pub struct SharedIndex {
    current: RwLock<Arc<Index>>,
    /// The last load error, while the index in service is older than the store.
    last_error: RwLock<Option<String>>,
    /// When the index in service was last known to match the store; `None`
    /// until the first load.
    checked: RwLock<Option<SystemTime>>,
}

impl SharedIndex {
    /// The snapshot in service.
    pub fn get(&self) -> Arc<Index> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether any snapshot was loaded, and the last load error if the newest failed.
    pub fn health(&self) -> (bool, Option<String>) {
        let loaded = self.checked_at().is_some();
        (
            loaded,
            self.last_error.read().unwrap_or_else(|e| e.into_inner()).clone(),
        )
    }

    /// Puts `index` in service.
    pub fn set(&self, index: Index) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(index);
        *self.last_error.write().unwrap_or_else(|e| e.into_inner()) = None;
        *self.checked.write().unwrap_or_else(|e| e.into_inner()) = Some(SystemTime::now());
    }

    /// Records that the index in service was just found to match the store (a
    /// no-op before the first load: there is nothing to vouch for).
    pub fn confirm(&self) {
        if let Some(at) = self.checked.write().unwrap_or_else(|e| e.into_inner()).as_mut() {
            *at = SystemTime::now();
        }
    }

    /// When the index in service was last known to match the store (loaded, or
    /// confirmed by an unchanged store generation).
    pub fn checked_at(&self) -> Option<SystemTime> {
        *self.checked.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the source could not be read: the index in service stays, and
    /// readiness and metrics say it may be stale until the next [`SharedIndex::set`].
    pub fn fail(&self, error: String) {
        *self.last_error.write().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// Reloads from `store`; on failure the previous snapshot stays in service and
    /// the error is kept for readiness and metrics.
    pub fn refresh(&self, store: &dyn ProfileStore) -> Result<Arc<Index>, StoreError> {
        let previous = self.get();
        match Index::load(store, Some(&previous)) {
            Ok(index) => {
                self.set(index);
                Ok(self.get())
            }
            Err(e) => {
                self.fail(e.to_string());
                Err(e)
            }
        }
    }
}

/// Timer polls that may trust an unchanged store generation before one full load.
const FULL_LOAD_EVERY: u32 = 30;

/// Keeps a [`SharedIndex`] in step with an [`FsStore`](profile_store::FsStore):
/// refreshes when the store directory changes (a recursive watch) and every `poll`
/// as a backstop, off the request path. A poll that finds the store's generation
/// unchanged does not walk the store (that walk took ~180 ms of CPU with 10,000
/// workloads and showed in admission's p99), except every [`FULL_LOAD_EVERY`]th.
/// Stops when the handle is dropped.
pub fn watch_store(
    shared: Arc<SharedIndex>,
    store: profile_store::FsStore,
    poll: std::time::Duration,
    metrics: crate::metrics::Metrics,
) -> StoreWatch {
    use notify::Watcher;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if certs::reload::is_change(&event) {
            let _ = tx.send(());
        }
    })
    .and_then(|mut w| w.watch(store.root(), notify::RecursiveMode::Recursive).map(|()| w))
    .map_err(|e| tracing::warn!(error = %e, "cannot watch the store; relying on polling"))
    .ok();
    let task = tokio::spawn(async move {
        // The store generation the index in service was loaded at, and how many
        // timer polls found it unchanged since the last full load.
        let mut seen: Option<String> = None;
        let mut quiet_polls = 0u32;
        let mut forced = true;
        loop {
            let refresh = {
                let (shared, store, metrics) = (shared.clone(), store.clone(), metrics.clone());
                let seen = seen.clone();
                tokio::task::spawn_blocking(move || {
                    // Read before loading: a write after this changes it again.
                    let generation = store.generation().ok().flatten();
                    if !forced && generation.is_some() && generation == seen {
                        shared.confirm();
                        return (seen, false);
                    }
                    let result = shared.refresh(&store);
                    match &result {
                        Ok(index) => {
                            metrics.workloads_in_fallback.set(index.in_fallback() as i64);
                            metrics.store_versions.set(index.versions as i64);
                        }
                        Err(e) => {
                            metrics.index_load_failures.inc();
                            tracing::warn!(error = %e, "profile index not refreshed; the previous one stays in service");
                        }
                    }
                    (result.ok().and(generation), true)
                })
            };
            if let Ok((generation, loaded)) = refresh.await {
                seen = generation;
                quiet_polls = if loaded { 0 } else { quiet_polls + 1 };
            }
            let by_timer = tokio::select! {
                event = rx.recv() => {
                    if event.is_none() {
                        tokio::time::sleep(poll).await;
                        true
                    } else {
                        // A build writes many files: let it finish, then load once.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        while rx.try_recv().is_ok() {}
                        false
                    }
                }
                _ = tokio::time::sleep(poll) => true,
            };
            // A watch event, or a long quiet spell (files changed by hand do not
            // move the generation), means a full load.
            forced = !by_timer || quiet_polls >= FULL_LOAD_EVERY;
        }
    });
    StoreWatch {
        task,
        _watcher: watcher,
    }
}

/// Keeps [`watch_store`] running; dropping it stops the watch.
#[derive(Debug)]
pub struct StoreWatch {
    task: tokio::task::JoinHandle<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Drop for StoreWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod watch_tests {
    use super::*;
    use profile_store::{FsStore, ProfileStore};
    use std::time::Instant;

    /// Regression: the index refresh reads every record, and the directory watch
    /// took those reads for changes, so an idle webhook reloaded its index without
    /// end (86% of a core with 10,000 profiles).
    #[tokio::test]
    async fn an_idle_store_is_not_reloaded_by_the_index_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open_or_create(dir.path()).unwrap();
        let key: WorkloadKey = "ns/pod/p/c".parse().unwrap();
        store
            .update(&key, &mut |r| {
                r.baseline.events = 1;
                Ok(())
            })
            .unwrap();
        let shared = Arc::new(SharedIndex::default());
        let _watch = watch_store(
            shared.clone(),
            store.clone(),
            std::time::Duration::from_secs(30),
            crate::metrics::Metrics::default(),
        );
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while shared.get().loaded_at.is_none() {
            assert!(Instant::now() < deadline, "never loaded");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let first = shared.get().loaded_at;
        tokio::time::sleep(std::time::Duration::from_millis(800)).await;
        assert_eq!(shared.get().loaded_at, first, "the index reloaded with nothing changed");
        // A real change is still seen quickly.
        store
            .update(&key, &mut |r| {
                r.baseline.events = 2;
                Ok(())
            })
            .unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(3);
        while shared.get().loaded_at == first {
            assert!(Instant::now() < deadline, "a change was not picked up");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Counts the records a refresh reads.
    struct Counting {
        inner: FsStore,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl ProfileStore for Counting {
        fn keys(&self) -> Result<Vec<WorkloadKey>, StoreError> {
            self.inner.keys()
        }
        fn record(&self, key: &WorkloadKey) -> Result<Option<WorkloadRecord>, StoreError> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.record(key)
        }
        fn record_stamp(&self, key: &WorkloadKey) -> Result<Option<String>, StoreError> {
            self.inner.record_stamp(key)
        }
        fn generation(&self) -> Result<Option<String>, StoreError> {
            self.inner.generation()
        }
        fn profile(&self, key: &WorkloadKey, version: &Version) -> Result<profile_store::SeccompProfile, StoreError> {
            self.inner.profile(key, version)
        }
        fn put_version(&self, key: &WorkloadKey, rendered: &profile_store::Rendered) -> Result<(), StoreError> {
            self.inner.put_version(key, rendered)
        }
        fn update(
            &self,
            key: &WorkloadKey,
            f: &mut dyn FnMut(&mut WorkloadRecord) -> Result<(), StoreError>,
        ) -> Result<WorkloadRecord, StoreError> {
            self.inner.update(key, f)
        }
    }

    /// Regression: every poll re-read and re-parsed every record (~225 ms of CPU
    /// per poll with 10,000 workloads, taken from admission).
    #[test]
    fn a_refresh_reads_only_the_records_that_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Counting {
            inner: FsStore::open_or_create(dir.path()).unwrap(),
            reads: Default::default(),
        };
        let keys: Vec<WorkloadKey> = ["ns/pod/a/c", "ns/pod/b/c", "ns/pod/c/c"]
            .iter()
            .map(|k| k.parse().unwrap())
            .collect();
        for key in &keys {
            store
                .update(key, &mut |r| {
                    r.baseline.events = 1;
                    Ok(())
                })
                .unwrap();
        }
        let reads = || store.reads.swap(0, std::sync::atomic::Ordering::SeqCst);
        let first = Index::load(&store, None).unwrap();
        assert_eq!(reads(), 3);
        let second = Index::load(&store, Some(&first)).unwrap();
        assert_eq!(reads(), 0, "unchanged records were read again");
        assert_eq!(second.entries, first.entries);
        store
            .update(&keys[1], &mut |r| {
                r.state.fallback = Some(profile_store::store::Fallback {
                    reason: "crash".into(),
                    since: "2026-11-30T00:00:00Z".parse().unwrap(),
                });
                Ok(())
            })
            .unwrap();
        let third = Index::load(&store, Some(&second)).unwrap();
        assert_eq!(reads(), 1, "only the changed record is read");
        assert_eq!(third.entry(&keys[1]).unwrap().fallback.as_deref(), Some("crash"));
        assert_eq!(third.in_fallback(), 1);
    }
}
