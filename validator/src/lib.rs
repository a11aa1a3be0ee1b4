//! Staging replay: run a workload in a real OCI runtime (runc) under a seccomp
//! profile, the way a node would.
//!
//! This first part gives the runc runner the validator issue builds its
//! probe/enforce comparison on. The bundle is the one that works on machines
//! without a container engine: the rootfs is an empty directory with the host's
//! `/usr` and `/etc` bind-mounted read-only (plus the merged-`/usr` symlinks), a
//! writable tmpfs `/tmp` as working directory, the host network namespace (so
//! loopback works), and no `/sys/fs/cgroup` mount (it fails on hybrid cgroup hosts).

pub mod runc;

pub use runc::{Exit, RunOutcome, RunSpec, ValidatorError, run_in_runc, runc_path};
