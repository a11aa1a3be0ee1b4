//! tether's admission webhook.
//!
//! Empty until the webhook issue: it will hold the pure `decide` function over a pod,
//! the namespace policy and a profile lookup, the JSON-patch rendering, and the axum
//! router. Workload keys at admission come from
//! [`profile_store::key::key_at_admission`], which is already tested against the
//! Tetragon side.
