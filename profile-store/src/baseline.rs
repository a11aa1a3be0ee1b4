//! `Baseline`: what one workload container was observed doing.

use crate::abi::Abi;
use crate::key::WorkloadKey;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// How much of the observation window must have passed without a new syscall for a
/// baseline to count as converged: half of it.
pub const CONVERGED_QUIET_RATIO: f64 = 0.5;

/// Per-syscall statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyscallStats {
    /// How many times it was seen.
    pub count: u64,
    /// Earliest time it was seen (absent for inputs without timestamps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<Timestamp>,
    /// Latest time it was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Timestamp>,
}

/// Events that were seen for this workload but deliberately left out of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Excluded {
    /// Events of processes entered into the container from outside (`in_init_tree:
    /// false`: `kubectl exec`, nsenter), which a baseline must not learn.
    pub not_in_init_tree: u64,
}

/// The syscalls one workload container was observed making, with enough context to
/// judge how complete the observation is.
///
/// Merging ([`Baseline::merge`]) is commutative and associative, so baselines built
/// from separate inputs (nodes, days) combine in any order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    /// Which workload container.
    pub key: WorkloadKey,
    /// Syscall name -> statistics.
    pub syscalls: BTreeMap<String, SyscallStats>,
    /// Pods (replicas) that contributed events.
    pub pods: BTreeSet<String>,
    /// Nodes that contributed events.
    pub nodes: BTreeSet<String>,
    /// ABIs the syscalls were made through.
    pub abis: BTreeSet<Abi>,
    /// Syscall events counted into `syscalls`.
    pub events: u64,
    /// Process starts (`process_exec`, or processes in an strace log).
    pub processes: u64,
    /// Process exits.
    pub exits: u64,
    /// Exec liveness/readiness probe events, kept even though they come from outside
    /// the container's init tree, because the probe runs under the container's profile.
    pub exec_probe_events: u64,
    /// Events left out on purpose.
    pub excluded: Excluded,
    /// Events Tetragon reported dropped (rate limiting) on the nodes this workload ran
    /// on: when non-zero, the baseline may be missing syscalls.
    pub dropped_on_nodes: u64,
    /// Earliest event of any kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_start: Option<Timestamp>,
    /// Latest event of any kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_end: Option<Timestamp>,
}

/// How settled a baseline is: the time since its newest syscall first appeared,
/// relative to the observation window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Convergence {
    /// Length of the observation window.
    pub window: SignedDuration,
    /// Time from the last new syscall to the end of the window.
    pub quiet: SignedDuration,
    /// `quiet / window` (0 when the window is empty).
    pub ratio: f64,
    /// Whether `ratio >= CONVERGED_QUIET_RATIO` and the window is not empty.
    pub converged: bool,
}

fn min_opt(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_opt(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    a.max(b)
}

impl Baseline {
    /// An empty baseline for `key`.
    pub fn new(key: WorkloadKey) -> Self {
        Baseline {
            key,
            syscalls: BTreeMap::new(),
            pods: BTreeSet::new(),
            nodes: BTreeSet::new(),
            abis: BTreeSet::new(),
            events: 0,
            processes: 0,
            exits: 0,
            exec_probe_events: 0,
            excluded: Excluded::default(),
            dropped_on_nodes: 0,
            window_start: None,
            window_end: None,
        }
    }

    /// Widens the observation window to include `t`.
    pub fn see_time(&mut self, t: Option<Timestamp>) {
        self.window_start = min_opt(self.window_start, t);
        self.window_end = max_opt(self.window_end, t);
    }

    /// Records one syscall event.
    pub fn record_syscall(&mut self, name: &str, abi: Abi, t: Option<Timestamp>) {
        self.events += 1;
        self.abis.insert(abi);
        self.see_time(t);
        // Look up before inserting: most events hit an existing entry, and the
        // allocation of the key string is only needed for new ones.
        let stats = match self.syscalls.get_mut(name) {
            Some(s) => s,
            None => self.syscalls.entry(name.to_string()).or_default(),
        };
        stats.count += 1;
        stats.first_seen = min_opt(stats.first_seen, t);
        stats.last_seen = max_opt(stats.last_seen, t);
    }

    /// Records that `pod` on `node` contributed.
    pub fn record_source(&mut self, pod: Option<&str>, node: Option<&str>) {
        // Check before inserting: the names are nearly always known already, and
        // `insert` would need an owned copy first.
        if let Some(p) = pod.filter(|p| !p.is_empty() && !self.pods.contains(*p)) {
            self.pods.insert(p.to_string());
        }
        if let Some(n) = node.filter(|n| !n.is_empty() && !self.nodes.contains(*n)) {
            self.nodes.insert(n.to_string());
        }
    }

    /// Adds `other` into `self`: counts add up, times widen, sets unite.
    ///
    /// # Panics
    /// Never; merging baselines of different keys keeps `self`'s key (callers merge
    /// per key).
    pub fn merge(&mut self, other: &Baseline) {
        for (name, s) in &other.syscalls {
            let mine = self.syscalls.entry(name.clone()).or_default();
            mine.count += s.count;
            mine.first_seen = min_opt(mine.first_seen, s.first_seen);
            mine.last_seen = max_opt(mine.last_seen, s.last_seen);
        }
        self.pods.extend(other.pods.iter().cloned());
        self.nodes.extend(other.nodes.iter().cloned());
        self.abis.extend(other.abis.iter().copied());
        self.events += other.events;
        self.processes += other.processes;
        self.exits += other.exits;
        self.exec_probe_events += other.exec_probe_events;
        self.excluded.not_in_init_tree += other.excluded.not_in_init_tree;
        self.dropped_on_nodes += other.dropped_on_nodes;
        self.window_start = min_opt(self.window_start, other.window_start);
        self.window_end = max_opt(self.window_end, other.window_end);
    }

    /// The observed syscall names, sorted.
    pub fn syscall_names(&self) -> impl Iterator<Item = &str> {
        self.syscalls.keys().map(String::as_str)
    }

    /// Convergence, when the inputs carried timestamps.
    pub fn convergence(&self) -> Option<Convergence> {
        let (start, end) = (self.window_start?, self.window_end?);
        let last_new = self.syscalls.values().filter_map(|s| s.first_seen).max()?;
        let window = end.duration_since(start);
        let quiet = end.duration_since(last_new);
        let ratio = if window.is_zero() {
            0.0
        } else {
            quiet.as_secs_f64() / window.as_secs_f64()
        };
        Some(Convergence {
            window,
            quiet,
            ratio,
            converged: !window.is_zero() && ratio >= CONVERGED_QUIET_RATIO,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> WorkloadKey {
        "ns/deployment/app/c".parse().unwrap()
    }

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    prop_compose! {
        fn arb_baseline()(
            calls in proptest::collection::vec((0usize..6, 1u64..5, proptest::option::of(0i64..1000)), 0..12),
            pods in proptest::collection::btree_set("[a-c]", 0..3),
            nodes in proptest::collection::btree_set("[x-z]", 0..3),
            processes in 0u64..5, exits in 0u64..5, excluded in 0u64..5, dropped in 0u64..5, probes in 0u64..3,
            span in proptest::option::of((0i64..1000, 0i64..1000)),
        ) -> Baseline {
            const NAMES: [&str; 6] = ["read", "write", "openat", "clone3", "futex", "mmap"];
            let mut b = Baseline::new(key());
            for (i, n, t) in calls {
                for _ in 0..n {
                    b.record_syscall(NAMES[i], if i % 2 == 0 { Abi::X86_64 } else { Abi::I386 }, t.map(ts));
                }
            }
            for p in &pods { b.record_source(Some(p), None); }
            for n in &nodes { b.record_source(None, Some(n)); }
            b.processes = processes;
            b.exits = exits;
            b.excluded.not_in_init_tree = excluded;
            b.dropped_on_nodes = dropped;
            b.exec_probe_events = probes;
            if let Some((a, z)) = span { b.see_time(Some(ts(a))); b.see_time(Some(ts(z))); }
            b
        }
    }

    fn merged(a: &Baseline, b: &Baseline) -> Baseline {
        let mut m = a.clone();
        m.merge(b);
        m
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in arb_baseline(), b in arb_baseline()) {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
        }

        #[test]
        fn merge_is_associative(a in arb_baseline(), b in arb_baseline(), c in arb_baseline()) {
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
        }

        #[test]
        fn merge_with_empty_is_identity(a in arb_baseline()) {
            prop_assert_eq!(merged(&a, &Baseline::new(key())), a);
        }
    }

    #[test]
    fn merge_adds_counts_and_widens_times() {
        let mut a = Baseline::new(key());
        a.record_syscall("read", Abi::X86_64, Some(ts(10)));
        let mut b = Baseline::new(key());
        b.record_syscall("read", Abi::X86_64, Some(ts(5)));
        b.record_syscall("read", Abi::X86_64, Some(ts(50)));
        a.merge(&b);
        let r = &a.syscalls["read"];
        assert_eq!((r.count, r.first_seen, r.last_seen), (3, Some(ts(5)), Some(ts(50))));
        assert_eq!((a.window_start, a.window_end), (Some(ts(5)), Some(ts(50))));
        assert_eq!(a.events, 3);
    }

    #[test]
    fn convergence_measures_quiet_time_since_the_last_new_syscall() {
        let mut b = Baseline::new(key());
        b.record_syscall("read", Abi::X86_64, Some(ts(0)));
        b.record_syscall("write", Abi::X86_64, Some(ts(30)));
        b.record_syscall("read", Abi::X86_64, Some(ts(100)));
        let c = b.convergence().unwrap();
        assert_eq!(c.window, SignedDuration::from_secs(100));
        assert_eq!(c.quiet, SignedDuration::from_secs(70));
        assert!(c.converged);
        b.record_syscall("openat", Abi::X86_64, Some(ts(90)));
        let c = b.convergence().unwrap();
        assert!(!c.converged, "{c:?}");
        assert!((c.ratio - 0.1).abs() < 1e-9);
    }

    #[test]
    fn no_timestamps_means_unknown_convergence() {
        let mut b = Baseline::new(key());
        b.record_syscall("read", Abi::X86_64, None);
        assert!(b.convergence().is_none());
    }
}
