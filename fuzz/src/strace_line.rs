//! strace output lines -> `StraceParser::parse_line` (with and without a `-ff`
//! file pid) and the whole input through `Ingest::read_strace`.

use profile_store::strace::StraceParser;
use profile_store::{Abi, Ingest, IngestOptions, WorkloadKey};

/// Parses each line with fresh and running parser state, then ingests `data`.
pub fn fuzz_one(data: &[u8]) {
    for file_pid in [None, Some(1207)] {
        let mut parser = StraceParser::new(Abi::host(), file_pid);
        for line in data.split(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(line);
            let _ = parser.parse_line(&line);
        }
    }
    let key: WorkloadKey = match "fuzz/deployment/strace/app".parse() {
        Ok(k) => k,
        Err(e) => panic!("the fuzz key is a key: {e}"),
    };
    let mut ingest = Ingest::new(IngestOptions::default());
    if let Err(e) = ingest.read_strace("fuzz", &mut &data[..], key, None) {
        panic!("reading from memory failed: {e}");
    }
    let (baselines, report) = ingest.finish();
    assert!(
        baselines.len() <= 1,
        "one strace input made {} baselines",
        baselines.len()
    );
    assert!(
        report.malformed_samples.len() <= profile_store::ingest::MALFORMED_SAMPLES,
        "more malformed samples than the cap"
    );
}
