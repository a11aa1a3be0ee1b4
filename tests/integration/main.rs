//! Cross-crate integration tests: the `tether` binary against real files, real
//! strace and real runc. One test binary for the whole workspace.

// Test helpers outside #[test] functions panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod certs_rotation;
mod common;
mod e2e;
mod fuzz_corpus;
mod hostile;
mod profiles_cli;
mod security;
mod serve_cli;
mod store_crash;
mod strace_to_runc;
mod tetragon_build;
mod tls;
mod validate_corpus;
mod validate_read_trace;
mod validate_under_filter;
mod webhook_tls;
