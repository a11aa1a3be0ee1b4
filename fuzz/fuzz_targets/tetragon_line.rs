//! libFuzzer harness: see [`tether_fuzz::tetragon_line`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz::tetragon_line::fuzz_one(data));
