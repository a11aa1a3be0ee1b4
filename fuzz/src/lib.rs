//! The fuzz targets of tether, as plain functions: each `fuzz_one` takes any bytes,
//! must not panic on them, and asserts the invariants its input path promises.
//!
//! They live in a library, not in the libFuzzer harnesses, so that the corpus
//! replay test (`tests/integration/fuzz_corpus.rs`, in the main workspace) runs
//! every committed input through exactly the code libFuzzer runs, on stable and
//! without cargo-fuzz.

pub mod admission;
pub mod pem;
pub mod profile_json;
pub mod strace_line;
pub mod tetragon_line;
