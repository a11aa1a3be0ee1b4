//! libFuzzer harness: see [`tether_fuzz::admission`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz::admission::fuzz_one(data));
