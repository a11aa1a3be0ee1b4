//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/*`: the seeds
//! and every input a fuzz run ever crashed on) through its target's `fuzz_one`,
//! on stable and without cargo-fuzz, on every `cargo test`.
//!
//! The targets are compiled here from `fuzz/src`, the same source the libFuzzer
//! harnesses link, so a fix that regresses fails this test, not just a fuzz run.

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::path::PathBuf;

fn replay(target: &str, fuzz_one: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    // An emptied corpus directory would make this pass without testing anything.
    assert!(files.len() >= 5, "{}: only {} inputs", dir.display(), files.len());
    let failed: Vec<String> = files
        .iter()
        .filter(|file| {
            let data = std::fs::read(file).unwrap();
            std::panic::catch_unwind(|| fuzz_one(&data)).is_err()
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(failed.is_empty(), "inputs that fail their fuzz target: {failed:#?}");
}

#[test]
fn admission_fuzz_corpus_passes_mutate_validate_and_idempotence() {
    replay("admission", targets::admission::fuzz_one);
}

#[test]
fn tetragon_fuzz_corpus_parses_and_parallel_ingest_matches_sequential() {
    replay("tetragon_line", targets::tetragon_line::fuzz_one);
}

#[test]
fn strace_fuzz_corpus_parses() {
    replay("strace_line", targets::strace_line::fuzz_one);
}

#[test]
fn profile_fuzz_corpus_round_trips_through_canonical_json() {
    replay("profile_json", targets::profile_json::fuzz_one);
}

#[test]
fn pem_fuzz_corpus_loads_or_is_refused() {
    replay("pem", targets::pem::fuzz_one);
}
