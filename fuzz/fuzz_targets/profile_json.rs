//! libFuzzer harness: see [`tether_fuzz::profile_json`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz::profile_json::fuzz_one(data));
