//! tether's node installer (`tether install`): a DaemonSet that writes every
//! active or recent profile version, and its Log-mode variant, under
//! `<kubelet-root>/seccomp/tether/`, removes versions no pod on the node
//! references any more, and reports what the node has in its
//! `ProfileInstallation`, so that the webhook injects only versions the nodes hold.
//!
//! The core is pure: [`plan`] says which files a node should hold and which may
//! go. [`node`] is the thin file-system shell (atomic writes, hash checks, removal
//! confined to `seccomp/tether/`), [`report`] the status report, and [`run`] the
//! watch loop that ties them to the API server.

pub mod node;
pub mod plan;
pub mod report;
pub mod run;

pub use node::{NodeDir, NodeError};
pub use plan::{Desired, Gc, PlanOptions};
pub use run::{InstallOptions, run};
