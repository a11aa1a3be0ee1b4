//! Staging replay: does a workload do anything its profile would block, and does
//! it still work under the profile? [`validate()`] runs it traced (the probe), then
//! under the profile in a real OCI runtime ([`runc`]) or in-process ([`process`]),
//! and compares.
//!
//! The runc bundle is the one that works on machines
//! without a container engine: the rootfs is an empty directory with the host's
//! `/usr` and `/etc` bind-mounted read-only (plus the merged-`/usr` symlinks), a
//! writable tmpfs `/tmp` as working directory, the host network namespace (so
//! loopback works), and no `/sys/fs/cgroup` mount (it fails on hybrid cgroup hosts).

pub mod job;
pub mod observe;
pub mod process;
pub mod readback;
pub mod runc;
pub mod trace;
pub mod validate;

pub use runc::{Exit, RunOutcome, RunSpec, run_in_runc, runc_path};
pub use validate::{Report, Runtime, validate};

/// Why a validation could not run (a workload that breaks is a [`Report`], not an
/// error).
#[derive(Debug, thiserror::Error)]
pub enum ValidatorError {
    /// runc is not installed.
    #[error(
        "runc is not installed or not on PATH; install it (Debian/Ubuntu: apt-get install -y runc), or use --runtime process"
    )]
    RuncMissing,
    /// strace is not installed.
    #[error("strace is not installed or not on PATH; install it (Debian/Ubuntu: apt-get install -y strace)")]
    StraceMissing,
    /// Preparing or running something failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The command ran past its deadline and was killed.
    #[error("the command ran longer than {0:?} and was killed; raise --timeout")]
    Timeout(std::time::Duration),
    /// The profile cannot be turned into an in-process filter.
    #[error("cannot build the seccomp filter: {0}")]
    Filter(String),
    /// The invocation is wrong.
    #[error("{0}")]
    Usage(String),
}
