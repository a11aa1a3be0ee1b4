//! What `/mutate` computed for a pod template, kept for the next pod made from it.
//!
//! Controllers create pods from templates: a Deployment scaled to 50 replicas
//! sends 50 Pod CREATEs whose fields admission reads (labels, annotations,
//! owner, containers and their security contexts) are the same; only the uid
//! and fields tether never reads differ. What `/mutate` computes from those
//! fields, the namespace's view and the index (the decision, the patch, the
//! audit annotations, the warnings) is a pure function of them, and under load
//! it was a fifth of the server's CPU per admission. [`DecisionCache`] keeps it
//! per distinct input, so the other 49 pods reuse the first one's.
//!
//! What it guarantees: a cached result is only handed back for a pod whose
//! whole [`PodView`] (every field `decide` and `patch` read), namespace and
//! [`NamespaceView`] equal the ones it was computed for (compared in full: the
//! hash only finds candidates), under the same index snapshot (a new snapshot
//! empties the cache). The answer is therefore the one computing again gives;
//! the tests hold it byte for byte. Side effects (metrics, log lines) are not
//! cached: the caller runs them for every request.
//!
//! Bounded: at most `capacity` entries and [`MAX_BYTES`] of keys (by
//! [`PodView::weight`]); a result that would pass either empties the cache
//! first (no eviction order to get wrong; a template that comes back is
//! computed once more). A pod whose view weighs more than [`MAX_KEY_BYTES`] is
//! never kept.
//!
//! The key is hashed with foldhash, seeded at random per cache: SipHash (std's
//! `RandomState`) over the view's ~60 small fields was ~0.3 µs of each
//! admission under load. foldhash is only "minimally" resistant to crafted
//! collisions, and pod authors choose most of the key, so the cache does not
//! rely on it: at most [`MAX_PER_HASH`] results share a hash (more are
//! computed each time, not kept), which bounds what a lookup compares whatever
//! collisions a pod author finds.

use crate::decide::Decision;
use crate::index::Index;
use crate::metrics::Outcome;
use crate::policy::NamespaceView;
use crate::slim::PodView;
use crate::wire::Template;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, Weak};

/// Entries kept by default (`tether serve --decision-cache-entries`).
pub const DEFAULT_ENTRIES: usize = 1024;

/// The most the kept keys may weigh together ([`PodView::weight`]).
pub const MAX_BYTES: usize = 8 << 20;

/// The heaviest pod view kept (annotations may hold up to 256 KiB).
pub const MAX_KEY_BYTES: usize = 64 << 10;

/// The most results kept under one hash: a lookup compares at most this many
/// keys in full.
pub const MAX_PER_HASH: usize = 4;

/// What `/mutate` computes for a pod in enforce or dry-run mode, apart from
/// what is particular to the request (its uid).
#[derive(Debug)]
pub struct Computed {
    /// The decision (the caller counts and logs exemptions and fallbacks from it).
    pub decision: Decision,
    /// The answer (patch, audit annotations, warnings), written but for the uid.
    pub answer: Template,
    /// The outcome (metric label and log field).
    pub outcome: Outcome,
    /// The workload, for the log line.
    pub workload: String,
    /// The requests counter of this outcome, looked up once: a label set is
    /// hashed and looked up under a lock on every `get_or_create`.
    pub counted: Counter,
    /// The injections counter of each profile set, looked up once.
    pub injections: Vec<Counter>,
}

/// A kept result and the inputs it was computed from.
struct Slot {
    pod: PodView<'static>,
    namespace: String,
    view: NamespaceView,
    computed: Arc<Computed>,
}

#[derive(Default)]
struct Slots {
    /// The index snapshot the results were computed under. Weak: a replaced
    /// snapshot is freed even while the cache is idle, yet its allocation
    /// stays, so a newer snapshot can never be placed at the same address and
    /// be taken for it.
    index: Option<Weak<Index>>,
    /// By hash of the inputs; a bucket holds more than one slot only on a
    /// hash collision, and at most [`MAX_PER_HASH`].
    by_hash: HashMap<u64, Vec<Slot>>,
    len: usize,
    bytes: usize,
}

impl Slots {
    /// Whether the results kept were computed under `index`.
    fn is_under(&self, index: &Arc<Index>) -> bool {
        self.index
            .as_ref()
            .is_some_and(|kept| std::ptr::eq(kept.as_ptr(), Arc::as_ptr(index)))
    }

    fn clear(&mut self) {
        self.by_hash.clear();
        self.len = 0;
        self.bytes = 0;
    }
}

/// The cache (one per [`crate::review::Admission`], shared by its threads);
/// `S` hashes the inputs (tests give one that collides).
pub struct DecisionCache<S = foldhash::fast::RandomState> {
    capacity: usize,
    hasher: S,
    slots: Mutex<Slots>,
}

impl<S: BuildHasher> std::fmt::Debug for DecisionCache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionCache")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

impl Default for DecisionCache {
    fn default() -> Self {
        DecisionCache::new(DEFAULT_ENTRIES)
    }
}

/// Whether a result came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached {
    /// Found: computed for an earlier pod with the same inputs.
    Hit,
    /// Computed for this pod (and kept, within the bounds).
    Miss,
    /// Computed; the cache is off (capacity 0).
    Off,
}

impl Slot {
    /// Whether this slot was computed for exactly these inputs. (The kept view
    /// is `'static`; views are covariant, so it is compared as one of the
    /// request's lifetime.)
    fn is_for(&self, pod: &PodView<'_>, namespace: &str, view: &NamespaceView) -> bool {
        fn same<'a>(kept: &PodView<'a>, pod: &PodView<'a>) -> bool {
            kept == pod
        }
        self.namespace == namespace && self.view == *view && same(&self.pod, pod)
    }
}

impl DecisionCache {
    /// A cache of at most `capacity` results; 0 turns it off.
    pub fn new(capacity: usize) -> DecisionCache {
        DecisionCache::with_hasher(capacity, foldhash::fast::RandomState::default())
    }
}

impl<S: BuildHasher> DecisionCache<S> {
    /// A cache of at most `capacity` results, its inputs hashed by `hasher`.
    pub fn with_hasher(capacity: usize, hasher: S) -> DecisionCache<S> {
        DecisionCache {
            capacity,
            hasher,
            slots: Mutex::new(Slots::default()),
        }
    }

    /// Results kept now.
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The result for these inputs: kept, or `compute`d (outside the lock) and
    /// kept. `compute` must be a function of exactly these inputs; an error it
    /// returns is passed on and not kept.
    pub fn get_or_compute<E>(
        &self,
        pod: &PodView<'_>,
        namespace: &str,
        view: &NamespaceView,
        index: &Arc<Index>,
        compute: impl FnOnce() -> Result<Computed, E>,
    ) -> Result<(Arc<Computed>, Cached), E> {
        if self.capacity == 0 {
            return Ok((Arc::new(compute()?), Cached::Off));
        }
        let hash = self.hasher.hash_one((pod, namespace, view));
        {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            if !slots.is_under(index) {
                slots.clear();
                slots.index = Some(Arc::downgrade(index));
            }
            let found = slots
                .by_hash
                .get(&hash)
                .and_then(|bucket| bucket.iter().find(|s| s.is_for(pod, namespace, view)));
            if let Some(slot) = found {
                return Ok((slot.computed.clone(), Cached::Hit));
            }
        }
        let computed = Arc::new(compute()?);
        let weight = pod.weight() + namespace.len();
        if weight <= MAX_KEY_BYTES {
            let slot = Slot {
                pod: pod.to_static(),
                namespace: namespace.to_owned(),
                view: view.clone(),
                computed: computed.clone(),
            };
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            // Only under the snapshot it was computed for (the index may have
            // been swapped, and the cache emptied, while this one computed).
            if slots.is_under(index) {
                if slots.len >= self.capacity || slots.bytes + weight > MAX_BYTES {
                    slots.clear();
                }
                let bucket = slots.by_hash.entry(hash).or_default();
                // Another thread may have kept the same inputs meanwhile.
                if bucket.len() < MAX_PER_HASH && !bucket.iter().any(|s| s.is_for(pod, namespace, view)) {
                    bucket.push(slot);
                    slots.len += 1;
                    slots.bytes += weight;
                }
            }
        }
        Ok((computed, Cached::Miss))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Mode, Policy};
    use crate::tests::review;
    use std::cell::Cell;

    fn computed(outcome: Outcome) -> Computed {
        Computed {
            decision: Decision {
                mode: Mode::Enforce,
                containers: Vec::new(),
                exemption: crate::decide::Exemption::None,
                warnings: Vec::new(),
            },
            answer: Template::new(&kube::core::admission::AdmissionResponse::invalid("test")).unwrap(),
            outcome,
            workload: "-".into(),
            counted: Counter::default(),
            injections: Vec::new(),
        }
    }

    /// Looks `pod` up, counting the computations in `runs`.
    fn ask(
        cache: &DecisionCache,
        pod: &PodView<'_>,
        ns: &str,
        view: &NamespaceView,
        index: &Arc<Index>,
        runs: &Cell<u32>,
    ) -> Cached {
        let (_, how) = cache
            .get_or_compute::<()>(pod, ns, view, index, || {
                runs.set(runs.get() + 1);
                Ok(computed(Outcome::allowed))
            })
            .unwrap();
        how
    }

    #[test]
    fn results_are_kept_per_namespace_view_and_index() {
        let body = serde_json::to_string(
            &review("admission/apiserver-1.35/pod-create-replicaset-initcontainers.json")["request"]["object"],
        )
        .unwrap();
        let pod: PodView<'_> = serde_json::from_str(&body).unwrap();
        let enforce = Policy::default().namespace("shop", None);
        let dry = Policy::from_yaml("defaultMode: dry-run")
            .unwrap()
            .namespace("shop", None);
        assert_ne!(enforce, dry);
        let (one, two) = (Arc::new(Index::default()), Arc::new(Index::default()));
        let cache = DecisionCache::new(8);
        let runs = Cell::new(0);
        assert_eq!(ask(&cache, &pod, "shop", &enforce, &one, &runs), Cached::Miss);
        assert_eq!(ask(&cache, &pod, "shop", &enforce, &one, &runs), Cached::Hit);
        assert_eq!(ask(&cache, &pod, "shop", &dry, &one, &runs), Cached::Miss);
        assert_eq!(ask(&cache, &pod, "other", &enforce, &one, &runs), Cached::Miss);
        assert_eq!(ask(&cache, &pod, "shop", &dry, &one, &runs), Cached::Hit);
        assert_eq!(runs.get(), 3);
        assert_eq!(cache.len(), 3);
        // Another snapshot, even an equal one, empties the cache.
        assert_eq!(ask(&cache, &pod, "shop", &enforce, &two, &runs), Cached::Miss);
        assert_eq!(cache.len(), 1);
        // The view kept is the request's, with its strings owned.
        let owned = pod.to_static();
        drop(body);
        assert_eq!(ask(&cache, &owned, "shop", &enforce, &two, &runs), Cached::Hit);
        // The cache does not keep a snapshot alive.
        let (weak_one, weak_two) = (Arc::downgrade(&one), Arc::downgrade(&two));
        drop((one, two));
        assert!(weak_one.upgrade().is_none() && weak_two.upgrade().is_none());
    }

    /// Hashes every input to 0.
    #[derive(Default)]
    struct Zero;
    impl std::hash::Hasher for Zero {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, _: &[u8]) {}
    }

    #[test]
    fn colliding_inputs_get_their_own_results_and_a_hash_keeps_at_most_four() {
        let cache = DecisionCache::with_hasher(64, std::hash::BuildHasherDefault::<Zero>::default());
        let view = Policy::default().namespace("shop", None);
        let index = Arc::new(Index::default());
        let pods: Vec<String> = (0..10).map(|n| format!("pod-{n}")).collect();
        fn pod(name: &str) -> PodView<'_> {
            PodView {
                metadata: crate::slim::MetaView {
                    name: Some(name.into()),
                    ..Default::default()
                },
                spec: None,
            }
        }
        // Each pod's own result, though all share one hash.
        let answer = |name: &str| {
            let (computed, how) = cache
                .get_or_compute::<()>(&pod(name), "shop", &view, &index, || {
                    let mut c = computed(Outcome::allowed);
                    c.workload = name.to_owned();
                    Ok(c)
                })
                .unwrap();
            assert_eq!(computed.workload, name);
            how
        };
        for name in &pods {
            assert_eq!(answer(name), Cached::Miss);
        }
        assert_eq!(cache.len(), MAX_PER_HASH);
        for (n, name) in pods.iter().enumerate() {
            let want = if n < MAX_PER_HASH { Cached::Hit } else { Cached::Miss };
            assert_eq!(answer(name), want, "{name}");
        }
        assert_eq!(cache.len(), MAX_PER_HASH);
    }

    #[test]
    fn capacity_zero_computes_every_time_and_keeps_nothing() {
        let pod = PodView::default();
        let view = Policy::default().namespace("shop", None);
        let index = Arc::new(Index::default());
        let cache = DecisionCache::new(0);
        let runs = Cell::new(0);
        for _ in 0..3 {
            assert_eq!(ask(&cache, &pod, "shop", &view, &index, &runs), Cached::Off);
        }
        assert_eq!(runs.get(), 3);
        assert!(cache.is_empty());
    }

    #[test]
    fn errors_are_passed_on_and_not_kept() {
        let pod = PodView::default();
        let view = Policy::default().namespace("shop", None);
        let index = Arc::new(Index::default());
        let cache = DecisionCache::new(4);
        let failed = cache.get_or_compute(&pod, "shop", &view, &index, || Err("no"));
        assert_eq!(failed.err(), Some("no"));
        assert!(cache.is_empty());
        let runs = Cell::new(0);
        assert_eq!(ask(&cache, &pod, "shop", &view, &index, &runs), Cached::Miss);
        assert_eq!(runs.get(), 1);
    }
}
