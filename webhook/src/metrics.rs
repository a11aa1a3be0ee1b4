//! Prometheus metrics of the webhook (prefix `tether_`).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// Which endpoint answered.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Endpoint {
    /// `/mutate`.
    mutate,
    /// `/validate`.
    validate,
}

/// What the answer was.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// Allowed without changes (including requests tether does not handle).
    allowed,
    /// Allowed with a patch.
    patched,
    /// Allowed, with warnings of what enforce would do or refuse (dry-run).
    warned,
    /// Denied.
    denied,
    /// The request could not be read (HTTP 400).
    invalid,
}

impl Outcome {
    /// The name, in the metric label and the admission log line alike.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::allowed => "allowed",
            Outcome::patched => "patched",
            Outcome::warned => "warned",
            Outcome::denied => "denied",
            Outcome::invalid => "invalid",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Labels of admission requests.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// The admission operation (`CREATE`, `UPDATE`, ... or `unknown`).
    pub operation: &'static str,
    /// The namespace mode (`enforce`, `dry-run`, `off`, or `none` when not applicable).
    pub mode: &'static str,
    /// The outcome.
    pub decision: Outcome,
}

/// Labels of injections.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InjectionLabels {
    /// `Localhost`, `RuntimeDefault` or `Unconfined` (the profile type set).
    pub profile: &'static str,
}

/// Labels of exemptions.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExemptionLabels {
    /// `honored` or `refused`.
    pub result: &'static str,
}

/// Labels of crash fallbacks.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CrashLabels {
    /// `exit_code_159`, `sigsys` or `seccomp_load_error`.
    pub reason: &'static str,
}

/// The webhook's metrics; cloning shares them.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Admission requests by endpoint, operation, mode and decision.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to answer an admission request.
    pub duration: Family<EndpointLabel, Histogram, fn() -> Histogram>,
    /// `duration{endpoint="mutate"}`, looked up once (a lookup hashes the
    /// labels under a lock).
    pub mutate_duration: Histogram,
    /// `duration{endpoint="validate"}`, looked up once.
    pub validate_duration: Histogram,
    /// Profiles set on containers, by kind.
    pub injections: Family<InjectionLabels, Counter>,
    /// Exemptions honored and refused.
    pub exemptions: Family<ExemptionLabels, Counter>,
    /// Workloads in fallback in the index.
    pub workloads_in_fallback: Gauge,
    /// Versions the index knows.
    pub store_versions: Gauge,
    /// Seconds since the index was last loaded.
    pub index_age_seconds: Gauge<f64, AtomicU64>,
    /// Failed index loads (the previous index stays in service).
    pub index_load_failures: Counter,
    /// Node installers that count for install gating (ready, fresh heartbeat);
    /// 0 with gating on means nothing is injectable.
    pub ready_installers: Gauge,
    /// Workloads whose active version is not yet installed on every ready node
    /// (an older installed version, or none, is injected meanwhile).
    pub held_back_workloads: Gauge,
    /// Workloads the crash watcher put into fallback, by crash reason.
    pub crash_fallbacks: Family<CrashLabels, Counter>,
    /// 1 while this replica holds the crash watcher's Lease.
    pub crash_watcher_leader: Gauge,
    /// `/mutate` answers computed from a pod template's cached result
    /// ([`crate::cache`]).
    pub decision_cache_hits: Counter,
    /// `/mutate` answers computed afresh while the decision cache is on.
    pub decision_cache_misses: Counter,
    /// Handler panics caught at the router's boundary and answered with HTTP 500
    /// (any at all is a bug: no input should reach it).
    pub handler_panics: Counter,
    /// Certificate metrics.
    pub certs: certs::CertMetrics,
}

/// Label of the latency histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    /// The endpoint.
    pub endpoint: Endpoint,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~0.8 s: admission answers are sub-millisecond; the API server's
    // timeout is seconds.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00005, 2.0, 15,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        let duration: Family<EndpointLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let of = |endpoint| duration.get_or_create(&EndpointLabel { endpoint }).clone();
        let (mutate_duration, validate_duration) = (of(Endpoint::mutate), of(Endpoint::validate));
        Metrics {
            requests: Family::default(),
            duration,
            mutate_duration,
            validate_duration,
            injections: Family::default(),
            exemptions: Family::default(),
            workloads_in_fallback: Gauge::default(),
            store_versions: Gauge::default(),
            index_age_seconds: Gauge::default(),
            index_load_failures: Counter::default(),
            ready_installers: Gauge::default(),
            held_back_workloads: Gauge::default(),
            crash_fallbacks: Family::default(),
            crash_watcher_leader: Gauge::default(),
            decision_cache_hits: Counter::default(),
            decision_cache_misses: Counter::default(),
            handler_panics: Counter::default(),
            certs: certs::CertMetrics::default(),
        }
    }
}

impl Metrics {
    /// A registry with every metric, prefixed `tether`.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("tether");
        r.register(
            "admission_requests",
            "Admission requests by endpoint, operation, mode and decision",
            self.requests.clone(),
        );
        r.register(
            "admission_duration_seconds",
            "Time to answer an admission request",
            self.duration.clone(),
        );
        r.register(
            "injections",
            "Seccomp profiles set on containers, by profile type",
            self.injections.clone(),
        );
        r.register("exemptions", "Exemptions honored and refused", self.exemptions.clone());
        r.register(
            "workloads_in_fallback",
            "Workloads running under their fallback",
            self.workloads_in_fallback.clone(),
        );
        r.register(
            "store_versions",
            "Profile versions in the admission index",
            self.store_versions.clone(),
        );
        r.register(
            "index_age_seconds",
            "Seconds since the admission index was last known to match the store",
            self.index_age_seconds.clone(),
        );
        r.register(
            "index_load_failures",
            "Failed loads of the admission index (the previous one stays)",
            self.index_load_failures.clone(),
        );
        r.register(
            "ready_installers",
            "Node installers that count for install gating (ready, fresh heartbeat)",
            self.ready_installers.clone(),
        );
        r.register(
            "held_back_workloads",
            "Workloads whose active version is not installed on every ready node yet",
            self.held_back_workloads.clone(),
        );
        r.register(
            "crash_fallbacks",
            "Workloads put into fallback after a container crashed under its profile, by reason",
            self.crash_fallbacks.clone(),
        );
        r.register(
            "crash_watcher_leader",
            "1 while this replica holds the crash watcher's Lease and acts on crashes",
            self.crash_watcher_leader.clone(),
        );
        r.register(
            "handler_panics",
            "Handler panics caught at the router and answered with HTTP 500 (each one is a bug)",
            self.handler_panics.clone(),
        );
        r.register(
            "decision_cache_hits",
            "/mutate answers built from the cached result of an identical pod template",
            self.decision_cache_hits.clone(),
        );
        r.register(
            "decision_cache_misses",
            "/mutate answers computed afresh while the decision cache is on",
            self.decision_cache_misses.clone(),
        );
        self.certs.register(&mut r);
        r
    }

    /// Starts timing a request; the time is recorded when the guard drops.
    pub fn timer(&self, endpoint: Endpoint) -> Timer<'_> {
        let histogram = match endpoint {
            Endpoint::mutate => &self.mutate_duration,
            Endpoint::validate => &self.validate_duration,
        };
        Timer {
            histogram,
            start: Instant::now(),
        }
    }
}

/// Records a request's duration when dropped.
pub struct Timer<'m> {
    histogram: &'m Histogram,
    start: Instant,
}

impl Timer<'_> {
    /// The time since the timer started: what the log line reports, so that it
    /// and the histogram measure from the same start (each reads the clock at
    /// its own end).
    pub fn elapsed(&self) -> std::time::Duration {
        self.start.elapsed()
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}
