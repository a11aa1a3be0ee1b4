//! Replays every committed corpus file (`corpus/<target>/*`) through its target's
//! `fuzz_one`, so the seeds and every crash the fuzzer ever found stay regression
//! inputs on stable Rust, without cargo-fuzz or libFuzzer.

use std::path::PathBuf;

fn replay(target: &str, fuzz_one: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    // An empty directory would make this test pass without testing anything.
    assert!(files.len() >= 5, "{}: only {} inputs", dir.display(), files.len());
    for file in files {
        let data = std::fs::read(&file).unwrap();
        let result = std::panic::catch_unwind(|| fuzz_one(&data));
        assert!(result.is_ok(), "{} fails its target", file.display());
    }
}

#[test]
fn admission_corpus_passes() {
    replay("admission", tether_fuzz::admission::fuzz_one);
}

#[test]
fn tetragon_line_corpus_passes() {
    replay("tetragon_line", tether_fuzz::tetragon_line::fuzz_one);
}

#[test]
fn strace_line_corpus_passes() {
    replay("strace_line", tether_fuzz::strace_line::fuzz_one);
}

#[test]
fn profile_json_corpus_passes() {
    replay("profile_json", tether_fuzz::profile_json::fuzz_one);
}

#[test]
fn pem_corpus_passes() {
    replay("pem", tether_fuzz::pem::fuzz_one);
}
