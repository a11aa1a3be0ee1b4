//! The domain core of tether: syscall tables, workload keys, observation parsers
//! (Tetragon, strace), baselines, seccomp profile rendering, and the profile store.
//!
//! Nothing here knows about HTTP, TLS or processes: the webhook, validator and CLI
//! crates build on it.

pub mod abi;
pub mod baseline;
#[cfg(feature = "kube")]
pub mod crd;
pub mod ingest;
pub mod key;
#[cfg(feature = "kube")]
pub mod kube_store;
pub mod render;
pub mod store;
pub mod strace;
pub mod synth;
pub mod tetragon;

pub use abi::Abi;
pub use baseline::Baseline;
pub use ingest::{Ingest, IngestError, IngestOptions, IngestReport};
pub use key::WorkloadKey;
#[cfg(feature = "kube")]
pub use kube_store::KubeStore;
pub use render::{Arch, RenderOptions, Rendered, RuntimeBase, SeccompProfile, Version, render};
pub use store::{FsStore, ProfileStore, StoreError, WorkloadRecord};
