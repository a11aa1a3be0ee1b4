//! libFuzzer harness: see [`tether_fuzz::strace_line`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz::strace_line::fuzz_one(data));
