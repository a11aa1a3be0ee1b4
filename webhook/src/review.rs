//! AdmissionReview in, AdmissionReview out: parse, call the pure decision
//! functions, build the answer from `AdmissionResponse::from(&request)` so the uid
//! is kept. No HTTP here.

use crate::cache::{Cached, Computed, DecisionCache};
use crate::decide::{Action, Decision, Exemption, FallbackProfile, decide, validate};
use crate::index::{Index, SharedIndex};
use crate::metrics::{Endpoint, ExemptionLabels, InjectionLabels, Metrics, Outcome, RequestLabels};
use crate::patch::{describe, mutation_patch};
use crate::policy::{Mode, NamespaceView, Policy};
use crate::slim::{self, Head, PodView};
use crate::wire::Template;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionResponse, AdmissionReview, Operation};
use serde::de::IgnoredAny;
use std::sync::Arc;

/// Why a request body cannot be answered (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unreadable(pub String);

/// Everything admission needs; shared by the handlers.
#[derive(Debug)]
pub struct Admission {
    /// The policy.
    pub policy: Policy,
    /// The index in service.
    pub index: Arc<SharedIndex>,
    /// Metrics.
    pub metrics: Metrics,
    /// What `/mutate` computed per pod template ([`DecisionCache`]).
    pub cache: DecisionCache,
}

// Built once per request and taken apart at once: a `Box` for the larger
// variant would only add an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Parsed<'a> {
    /// A Pod CREATE: what tether acts on (the request without its object, and
    /// the Pod read from the body).
    PodCreate(Head<'a>, Option<PodView<'a>>),
    /// Anything else: answered allowed and untouched.
    Other(Head<'a>),
}

/// A Pod CREATE and what the policy says of its namespace.
struct Act<'a> {
    req: Head<'a>,
    pod: PodView<'a>,
    view: NamespaceView,
}

#[allow(clippy::large_enum_variant)] // as `Parsed`
enum Step<'a> {
    /// A Pod CREATE to act on.
    Act(Act<'a>),
    /// Anything else, answered.
    Done(Box<AdmissionReview<DynamicObject>>),
}

fn parse(body: &[u8]) -> Result<Parsed<'_>, Unreadable> {
    // One pass reads the object as a Pod. When that fails, a second pass that
    // ignores the object tells a Pod CREATE whose Pod is wrong (an error) from a
    // request for another kind (allowed untouched) and from a body that is not an
    // AdmissionReview at all.
    //
    // JSON is UTF-8 (RFC 8259), and the whole body is checked once here: read
    // from a `&str`, serde_json does not check each string again (read from
    // bytes, those checks were ~7 % of an admission's CPU in a loop).
    let body = std::str::from_utf8(body).map_err(|e| {
        Unreadable(format!(
            "the body is not JSON: it is not UTF-8 ({e}); AdmissionReviews are UTF-8 JSON"
        ))
    })?;
    let (envelope, pod_error) = match serde_json::from_str::<slim::Envelope<PodView<'_>>>(body) {
        Ok(e) => ((e.api_version, e.kind, e.request.map(Ok)), None),
        Err(first) => match serde_json::from_str::<slim::Envelope<IgnoredAny>>(body) {
            Ok(e) => ((e.api_version, e.kind, e.request.map(Err)), Some(first)),
            Err(e) => {
                // serde_json reports some wrong types (a number where an enum
                // such as `operation` belongs) as syntax errors: only a body that
                // does not parse even as untyped JSON is called "not JSON".
                let is_json = e.is_data() || serde_json::from_str::<IgnoredAny>(body).is_ok();
                return Err(Unreadable(if is_json {
                    format!("the AdmissionReview does not parse (a field is missing or has the wrong type): {e}")
                } else {
                    format!("the body is not JSON: {e}")
                }));
            }
        },
    };
    let (api, kind, request) = envelope;
    let (api, kind) = (api.as_deref(), kind.as_deref());
    if api != Some("admission.k8s.io/v1") || kind != Some("AdmissionReview") {
        return Err(Unreadable(format!(
            "expected kind AdmissionReview, apiVersion admission.k8s.io/v1 (set admissionReviewVersions: [v1]); got kind {}, apiVersion {}",
            kind.unwrap_or("(none)"),
            api.unwrap_or("(none)")
        )));
    }
    let request = request.ok_or_else(|| Unreadable("the AdmissionReview has no request".into()))?;
    match request {
        Ok(r) if r.is_pod_create() => {
            let (req, pod) = r.split();
            Ok(Parsed::PodCreate(req, pod))
        }
        Err(r) if r.is_pod_create() => Err(Unreadable(format!(
            "the Pod in the request does not parse: {}",
            pod_error.map(|e| e.to_string()).unwrap_or_default()
        ))),
        // The objects of requests tether does not act on are not needed (and may
        // be any kind).
        Ok(r) => Ok(Parsed::Other(r.split().0)),
        Err(r) => Ok(Parsed::Other(r.split().0)),
    }
}

fn operation_of(req: &Head<'_>) -> &'static str {
    match req.operation {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        Operation::Delete => "DELETE",
        Operation::Connect => "CONNECT",
    }
}

impl Admission {
    fn count(&self, endpoint: Endpoint, operation: &'static str, mode: Option<Mode>, decision: Outcome) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                endpoint,
                operation,
                mode: mode.map_or("none", Mode::as_str),
                decision,
            })
            .inc();
    }

    /// Parses `body`: a Pod CREATE to act on, or the answer for anything else.
    fn pod_create<'a>(&self, endpoint: Endpoint, body: &'a [u8]) -> Result<Step<'a>, Unreadable> {
        match parse(body) {
            Ok(Parsed::PodCreate(req, pod)) => {
                let Some(pod) = pod else {
                    self.count(endpoint, "CREATE", None, Outcome::invalid);
                    return Err(Unreadable("the Pod CREATE request has no object".into()));
                };
                let view = self.policy.namespace(req.namespace(), None);
                Ok(Step::Act(Act { req, pod, view }))
            }
            Ok(Parsed::Other(req)) => {
                self.count(endpoint, operation_of(&req), None, Outcome::allowed);
                Ok(Step::Done(Box::new(allowed(&req).into_review())))
            }
            Err(e) => {
                self.count(endpoint, "unknown", None, Outcome::invalid);
                Err(e)
            }
        }
    }

    /// Answers `/mutate`: the bytes of the AdmissionReview to send back.
    pub fn mutate(&self, body: &[u8]) -> Result<Vec<u8>, Unreadable> {
        let timer = self.metrics.timer(Endpoint::mutate);
        let Act { req, pod, view } = match self.pod_create(Endpoint::mutate, body)? {
            Step::Act(act) => act,
            Step::Done(review) => return to_bytes(&review),
        };
        let (pod, namespace) = (&pod, req.namespace());
        if view.mode == Mode::Off {
            self.count(Endpoint::mutate, "CREATE", Some(Mode::Off), Outcome::allowed);
            return to_bytes(&allowed(&req).into_review());
        }
        let index = self.index.get();
        let (computed, cached) = self.cache.get_or_compute(pod, namespace, &view, &index, || {
            self.compute(allowed(&req), pod, namespace, &view, &index)
        })?;
        let counter = match cached {
            Cached::Hit => Some(&self.metrics.decision_cache_hits),
            Cached::Miss => Some(&self.metrics.decision_cache_misses),
            Cached::Off => None,
        };
        if let Some(counter) = counter {
            counter.inc();
        }
        let decision = &computed.decision;
        self.count_exemption(decision);
        for c in &decision.containers {
            if let Action::Fallback { reason, profile } = &c.action {
                tracing::warn!(container = %c.name, workload = %computed.workload, %reason, profile = ?profile, mode = %view.mode, "workload in fallback");
            }
        }
        for injected in &computed.injections {
            injected.inc();
        }
        let outcome = computed.outcome;
        computed.counted.inc();
        // Fields as `&str`: a JSON log records them as strings directly, where
        // `%`/`?` values go through `fmt` and an escaping adapter (a tenth of the
        // server's CPU per admission was this line).
        tracing::info!(
            endpoint = "mutate",
            uid = req.uid.as_str(),
            namespace,
            workload = computed.workload.as_str(),
            mode = view.mode.as_str(),
            decision = outcome.as_str(),
            dry_run = req.dry_run,
            duration_us = timer.elapsed().as_micros() as u64,
            "admission"
        );
        Ok(computed.answer.answer(&req.uid))
    }

    /// What `/mutate` answers for `pod` in `namespace` (enforce or dry-run),
    /// before anything particular to the request: a function of its arguments
    /// and the policy's `on_missing` only, which [`DecisionCache`] relies on.
    /// It builds on `res`, the request's [`allowed`] answer, of which the
    /// template keeps all but the uid (which [`Template::answer`] adds).
    fn compute(
        &self,
        mut res: AdmissionResponse,
        pod: &PodView<'_>,
        namespace: &str,
        view: &NamespaceView,
        index: &Index,
    ) -> Result<Computed, Unreadable> {
        let decision = decide(pod, namespace, view, self.policy.on_missing, index);
        let mut warnings = decision.warnings.clone();
        let mut audit_annotations = Vec::new();
        let mut patch = None;
        let mut injections: Vec<&'static str> = Vec::new();
        let outcome = match view.mode {
            Mode::Enforce => {
                let (ops, more) = mutation_patch(pod, &decision);
                warnings.extend(more);
                injections = decision.changes().map(|(_, p)| injection_label(&p)).collect();
                audit_annotations = audit(&decision);
                if ops.0.is_empty() {
                    Outcome::allowed
                } else {
                    patch = Some(
                        serde_json::to_vec(&ops).map_err(|e| Unreadable(format!("cannot serialize the patch: {e}")))?,
                    );
                    Outcome::patched
                }
            }
            Mode::DryRun | Mode::Off => {
                let would = describe(&decision);
                if !would.is_empty() {
                    audit_annotations.push(("dry-run".into(), would.join("; ")));
                }
                warnings.extend(would.into_iter().map(|w| format!("tether dry-run: {w}")));
                if warnings.is_empty() {
                    Outcome::allowed
                } else {
                    Outcome::warned
                }
            }
        };
        res.audit_annotations.extend(audit_annotations);
        if let Some(patch) = patch {
            // kube-core sets the patch type only in `with_patch`, which
            // serializes the patch it is given: given an empty one, then the
            // bytes serialized above.
            res = res
                .with_patch(json_patch::Patch(Vec::new()))
                .map_err(|e| Unreadable(format!("cannot serialize the patch: {e}")))?;
            res.patch = Some(patch);
        }
        if !warnings.is_empty() {
            res.warnings = Some(warnings);
        }
        let answer = Template::new(&res).map_err(|e| Unreadable(format!("cannot serialize the answer: {e}")))?;
        let counted = self
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                endpoint: Endpoint::mutate,
                operation: "CREATE",
                mode: view.mode.as_str(),
                decision: outcome,
            })
            .clone();
        let injections = injections
            .into_iter()
            .map(|profile| {
                self.metrics
                    .injections
                    .get_or_create(&InjectionLabels { profile })
                    .clone()
            })
            .collect();
        Ok(Computed {
            workload: workload(&decision),
            decision,
            answer,
            outcome,
            counted,
            injections,
        })
    }

    /// Answers `/validate`: the bytes of the AdmissionReview to send back.
    pub fn validate(&self, body: &[u8]) -> Result<Vec<u8>, Unreadable> {
        let timer = self.metrics.timer(Endpoint::validate);
        let Act { req, pod, view } = match self.pod_create(Endpoint::validate, body)? {
            Step::Act(act) => act,
            Step::Done(review) => return to_bytes(&review),
        };
        let (pod, namespace) = (&pod, req.namespace());
        let mut res = allowed(&req);
        let problems = if view.mode == Mode::Off {
            Vec::new()
        } else {
            validate(pod, namespace, &view, &*self.index.get())
        };
        let outcome = match (view.mode, problems.is_empty()) {
            (_, true) => Outcome::allowed,
            (Mode::Enforce, false) => {
                res = res.deny(format!("tether: {}", problems.join("; ")));
                res.audit_annotations.insert("denied".into(), problems.join("; "));
                Outcome::denied
            }
            (_, false) => {
                res.warnings = Some(
                    problems
                        .iter()
                        .map(|p| format!("tether dry-run would deny: {p}"))
                        .collect(),
                );
                res.audit_annotations.insert("dry-run-deny".into(), problems.join("; "));
                Outcome::warned
            }
        };
        self.count(Endpoint::validate, "CREATE", Some(view.mode), outcome);
        tracing::info!(
            endpoint = "validate",
            uid = req.uid.as_str(),
            namespace,
            mode = view.mode.as_str(),
            decision = outcome.as_str(),
            problems = problems.len(),
            duration_us = timer.elapsed().as_micros() as u64,
            "admission"
        );
        to_bytes(&res.into_review())
    }

    fn count_exemption(&self, d: &Decision) {
        let result = match &d.exemption {
            Exemption::Honored { reason, .. } => {
                tracing::warn!(reason = %reason, workload = %workload(d), "seccomp exemption honored");
                "honored"
            }
            Exemption::Refused { message } => {
                tracing::warn!(%message, workload = %workload(d), "seccomp exemption refused");
                "refused"
            }
            Exemption::None => return,
        };
        self.metrics.exemptions.get_or_create(&ExemptionLabels { result }).inc();
    }
}

/// The answer to `req` that allows it untouched, the start of every answer not
/// taken from the decision cache (`AdmissionResponse::from`, so the uid is kept).
fn allowed(req: &Head<'_>) -> AdmissionResponse {
    AdmissionResponse::from(&req.to_request::<DynamicObject>())
}

/// The bytes of `review` (written as [`crate::wire::to_vec`] writes them).
fn to_bytes(review: &AdmissionReview<DynamicObject>) -> Result<Vec<u8>, Unreadable> {
    crate::wire::to_vec(review).map_err(|e| Unreadable(format!("cannot serialize the answer: {e}")))
}

/// The injections metric's label for a profile set.
fn injection_label(profile: &k8s_openapi::api::core::v1::SeccompProfile) -> &'static str {
    match profile.type_.as_str() {
        "Localhost" => "Localhost",
        "RuntimeDefault" => "RuntimeDefault",
        "Unconfined" => "Unconfined",
        _ => "other",
    }
}

/// The workload of the pod's first container, for log lines (`-` when none).
fn workload(d: &Decision) -> String {
    d.containers
        .first()
        .and_then(|c| c.key.as_ref())
        .map(|k| format!("{}/{}/{}", k.namespace(), k.kind(), k.name()))
        .unwrap_or_else(|| "-".into())
}

/// Audit annotations that make every injection, exemption and fallback visible.
fn audit(d: &Decision) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let injected: Vec<String> = d
        .containers
        .iter()
        .filter_map(|c| match &c.action {
            Action::Inject { version, .. } => Some(format!("{}={version}", c.name)),
            _ => None,
        })
        .collect();
    if !injected.is_empty() {
        out.push(("injected".into(), injected.join(",")));
    }
    let fallbacks: Vec<String> = d
        .containers
        .iter()
        .filter_map(|c| match &c.action {
            Action::Fallback { reason, profile } => Some(format!(
                "{}={} ({reason})",
                c.name,
                match profile {
                    FallbackProfile::Unconfined => "Unconfined".to_string(),
                    FallbackProfile::Log { version, .. } => format!("log:{version}"),
                    FallbackProfile::RuntimeDefault => "RuntimeDefault".to_string(),
                }
            )),
            _ => None,
        })
        .collect();
    if !fallbacks.is_empty() {
        out.push(("fallback".into(), fallbacks.join(",")));
    }
    if let Exemption::Honored { reason, .. } = &d.exemption {
        out.push(("exempted".into(), reason.clone()));
    }
    out
}
