//! libFuzzer harness: see [`tether_fuzz::pem`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz::pem::fuzz_one(data));
