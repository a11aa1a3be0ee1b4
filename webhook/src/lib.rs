//! tether's admission webhook.
//!
//! Handlers are thin: [`review::Admission`] parses an AdmissionReview and calls the
//! pure functions of [`decide`] (what to inject, what to refuse) and [`patch`] (the
//! JSON patch); [`server`] puts them behind axum on rustls. Admission reads only
//! the in-memory [`index`] (fed by the store directory, or by the API server through
//! [`kube_index`], gated by [`gate`]), never the disk or the network.

pub mod cache;
pub mod crash;
pub mod decide;
pub mod gate;
pub mod index;
pub mod kube_index;
pub mod lease;
pub mod logbuf;
pub mod metrics;
pub mod patch;
pub mod policy;
pub mod review;
pub mod run;
pub mod server;
pub mod slim;
pub mod wire;

pub use index::{Index, Lookup, SharedIndex};
pub use policy::{Mode, OnMissing, Policy};
pub use review::Admission;

#[cfg(test)]
mod tests;
