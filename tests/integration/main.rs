//! Cross-crate integration tests: the `tether` binary against real files, real
//! strace and real runc. One test binary for the whole workspace.

mod common;
mod profiles_cli;
mod strace_to_runc;
mod tetragon_build;
