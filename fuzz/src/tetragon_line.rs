//! Tetragon export lines -> `tetragon::parse_line`, and the whole input through
//! `Ingest::read_tetragon` and `Ingest::read_tetragon_parallel`, which must agree
//! exactly (the parallel reader promises the single-threaded result whatever the
//! block size and thread count).

use profile_store::tetragon::{Buffers, TetragonOptions, parse_line};
use profile_store::{Abi, Ingest, IngestOptions};

/// Parses each line alone, then ingests all of `data` both ways.
pub fn fuzz_one(data: &[u8]) {
    let mut buffers = Buffers::default();
    for include_non_init in [false, true] {
        let opts = TetragonOptions {
            default_abi: Abi::host(),
            include_non_init,
        };
        for line in data.split(|b| *b == b'\n') {
            let mut line = line.to_vec();
            let _ = parse_line(&mut line, &opts, &mut buffers);
        }
    }

    let sequential = {
        let mut ingest = Ingest::new(IngestOptions::default());
        if let Err(e) = ingest.read_tetragon("fuzz", &mut &data[..]) {
            panic!("reading from memory failed: {e}");
        }
        ingest.finish()
    };
    // Blocks far smaller than the input, so lines straddle block boundaries.
    for (jobs, block) in [(2, 7), (3, 64)] {
        let mut ingest = Ingest::new(IngestOptions::default());
        if let Err(e) = ingest.read_tetragon_parallel("fuzz", &mut &data[..], jobs, block) {
            panic!("reading from memory failed: {e}");
        }
        let parallel = ingest.finish();
        assert_eq!(
            parallel, sequential,
            "read_tetragon_parallel (jobs {jobs}, block {block}) differs from read_tetragon"
        );
    }
}
